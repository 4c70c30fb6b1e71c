// Takes a screenshot of every demo page, with a little traffic so they have
// something to show: `node tests/browser/screenshots.js [OUT_DIR]`.
// Not a test: for looking at the pages as a person would.

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { launchBrowser, newPage, openChat, publish, send, startServer, waitForMessages } from './helpers.js';

const out = path.resolve(process.argv[2] || 'screenshots');
mkdirSync(out, { recursive: true });
const server = await startServer();
const browser = await launchBrowser();
try {
  const viewport = { width: 1200, height: 820 };
  const shot = async (page, name) => {
    await page.screenshot({ path: path.join(out, `${name}.png`), fullPage: true });
    console.log(path.join(out, `${name}.png`));
  };

  const page = await newPage(browser, server.url);
  await page.setViewportSize(viewport);
  await page.goto(server.url);
  await shot(page, 'index');

  const bob = await openChat(browser, server.url, { name: 'bob', room: 'Default', transport: 'sse' });
  const alice = await openChat(browser, server.url, { name: 'alice', room: 'Default', transport: 'ws' });
  await alice.setViewportSize(viewport);
  await send(bob, 'Hi! Is the deploy done?');
  await send(alice, 'Yes, 2 minutes ago. Everything is green.');
  await send(bob, 'Great, thanks!');
  await waitForMessages(alice, 3);
  await shot(alice, 'chat');

  for (let i = 1; i <= 3; i++) await publish(server.url, 'notifications/demo', { title: `Build #${40 + i} finished`, body: 'main is green.' }, 'notification');
  await page.goto(`${server.url}/bell`);
  await page.waitForSelector('#badge:not([hidden])');
  await shot(page, 'bell');
  await page.click('#bell');
  await page.waitForSelector('#badge', { state: 'hidden' });
  await shot(page, 'bell-open');

  // A user's inbox: log in, a notification to them, one to their group, one read.
  await page.goto(`${server.url}/bell?user=alice`);
  await shot(page, 'bell-login');
  const post = (p, body, method = 'POST') => fetch(`${server.url}${p}`, { method, headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  await post('/api/groups/staff/members', { users: ['alice'] }, 'PUT');
  await post('/api/notifications', { users: ['alice'], title: 'Welcome, Alice', body: 'Your account is ready.' });
  await post('/api/users/alice/read', { all: true });
  await post('/api/notifications', { group: 'staff', title: 'Stand-up in 5', body: 'Room 2' });
  await post('/api/notifications', { users: ['alice'], title: 'Review requested', body: 'bob asked you to review #42' });
  await page.click('#login');
  await page.waitForSelector('#badge:text-is("2")');
  await shot(page, 'bell-inbox');
  await page.click('#bell');
  await page.waitForSelector('#badge', { state: 'hidden' });
  await post('/api/notifications', { all: true, title: 'Maintenance tonight', body: '22:00–23:00 UTC' });
  await page.waitForSelector('#list .item.unread');
  await shot(page, 'bell-inbox-open');

  await page.goto(`${server.url}/admin`);
  for (let i = 0; i < 6; i++) {
    await Promise.all(Array.from({ length: 5 * i }, (_, k) => publish(server.url, 'chat/room/Default', { from: 'load', msg: String(k) }, 'chat')));
    await page.waitForTimeout(1000); // let the once-a-second chart draw a few points
  }
  await shot(page, 'admin');
} finally {
  await browser.close();
  await server.stop();
}
