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
