// The other demo pages: the bell counts what is unseen and clears when opened,
// the admin view draws /api/stats (or says it cannot), the home page links to
// the demos, and the chat's controls (reconnect, transport picker) resume
// without losing or repeating anything.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  launchBrowser, messages, newPage, openChat, expectEndpoints, publish, send, startServer, waitForMessages, LIMIT,
} from './helpers.js';

describe('demo pages', () => {
  let server;
  let browser;
  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  test('home links to every demo', LIMIT, async () => {
    const page = await newPage(browser, server.url);
    await page.goto(server.url);
    const links = await page.$$eval('main a[href]', as => as.map(a => a.getAttribute('href')));
    for (const href of ['/chat', '/bell', '/admin']) assert.ok(links.includes(href), `links to ${href}`);
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });

  test('the bell counts unseen notifications and clears when opened', LIMIT, async () => {
    const channel = 'notifications/bell-test';
    const notify = title => publish(server.url, channel, { title, body: `${title} body` }, 'notification');
    await notify('first'); // published before the page opens: history counts too

    const page = await newPage(browser, server.url);
    await page.goto(`${server.url}/bell?channel=${encodeURIComponent(channel)}`);
    await page.waitForSelector('#badge:text-is("1")');
    await notify('second');
    await page.waitForSelector('#badge:text-is("2")');
    assert.match(await page.title(), /^\(2\)/, 'the tab title carries the count');

    await page.click('#bell');
    await page.waitForSelector('#badge', { state: 'hidden' });
    assert.deepEqual(await page.$$eval('#list li .title', els => els.map(e => e.textContent)), ['second', 'first'], 'newest first');

    await notify('third'); // arrives while the list is open: seen at once
    await page.waitForSelector('#list li:first-child .title:text-is("third")');
    assert.equal(await page.isHidden('#badge'), true);

    await page.keyboard.press('Escape');
    await notify('fourth');
    await page.waitForSelector('#badge:text-is("1")');

    // Seen state survives a reload; sending from the page's own form counts too.
    await page.reload();
    await page.waitForSelector('#status[data-state="open"]');
    await page.fill('#title', 'fifth');
    await page.click('#notify');
    await page.waitForSelector('#badge:text-is("2")');
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });

  test("the bell on a user's inbox: the server's count, cleared on every device", LIMIT, async () => {
    const notify = async title => {
      const res = await fetch(`${server.url}/api/notifications`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ users: ['bella'], title, body: 'for bella' }),
      });
      assert.equal(res.status, 200, await res.text());
    };
    await notify('before');
    const phone = await newPage(browser, server.url);
    const laptop = await newPage(browser, server.url);
    for (const p of [phone, laptop]) {
      await p.goto(`${server.url}/bell?user=bella`);
      assert.equal(await p.inputValue('#user'), 'bella', 'the login form is prefilled');
      await p.click('#login');
    }
    await Promise.all([phone, laptop].map(p => p.waitForSelector('#badge:text-is("1")')));
    await notify('after');
    await Promise.all([phone, laptop].map(p => p.waitForSelector('#badge:text-is("2")')));

    await phone.click('#bell'); // read on one device ...
    await laptop.waitForSelector('#badge', { state: 'hidden' }); // ... cleared on the other
    assert.deepEqual(await phone.$$eval('#list li .title', els => els.map(e => e.textContent)), ['after', 'before']);
    const res = await fetch(`${server.url}/api/users/bella/unread`);
    assert.deepEqual(await res.json(), { count: 0 });
    assert.deepEqual([...phone.errors, ...laptop.errors], []);
    await phone.context().close();
    await laptop.context().close();
  });

  test('admin draws live stats', LIMIT, async () => {
    const listener = await openChat(browser, server.url, { name: 'watcher', room: 'admin', transport: 'sse' });
    const page = await newPage(browser, server.url);
    await page.goto(`${server.url}/admin`);
    await page.waitForFunction(() => Number(document.querySelector('#conn-total').textContent) >= 1);
    await publish(server.url, 'chat/room/admin', { from: 'x', msg: 'y' }, 'chat');
    // A rate needs two samples; the published total must show the message.
    await page.waitForFunction(() => /[1-9]\d* published/.test(document.querySelector('#totals').textContent));
    await page.waitForFunction(() => document.querySelectorAll('#chart-connections path.series').length === 5);
    assert.equal(await page.isHidden('#unavailable'), true);
    assert.deepEqual(page.errors, []);
    await page.context().close();
    await listener.context().close();
  });

  test('admin counts MQTT beside the web transports, and draws any section /api/stats adds', LIMIT, async () => {
    const device = await openChat(browser, server.url, { name: 'device', room: 'admin-mqtt', transport: 'mqtt' });
    const page = await newPage(browser, server.url);
    // The real answer, with sections a later server might add (limits hit,
    // jobs, Redis): the page must draw them without knowing them.
    await page.route('**/api/stats', async route => {
      const res = await route.fetch();
      const stats = await res.json();
      stats.limits = { rate_limited: { http: 3, publish: 1 }, too_many_connections: 0 };
      stats.redis = { state: 'up', shards: 2 };
      await route.fulfill({ response: res, json: stats });
    });
    await page.goto(`${server.url}/admin`);
    await page.waitForFunction(() => /MQTT\s*[1-9]/.test(document.querySelector('#legend-connections').textContent));
    await page.waitForSelector('[data-section="mqtt"] dd[data-key="sessions_live"]');
    assert.match(await page.textContent('[data-section="mqtt"] dd[data-key="sessions_live"]'), /^[1-9]/);
    assert.equal(await page.textContent('[data-section="limits"] dd[data-key="rate_limited http"]'), '3');
    assert.equal(await page.textContent('[data-section="redis"] dd[data-key="state"]'), 'up');
    assert.match(await page.textContent('[data-section="limits"] h2'), /Limits/);
    assert.deepEqual(page.errors, []);
    await page.context().close();
    await device.context().close();
  });

  test('admin says so when /api/stats is missing', LIMIT, async () => {
    const page = await newPage(browser, server.url);
    await page.route('**/api/stats', route => route.fulfill({ status: 404, contentType: 'application/json', body: '{"code":"not_found","message":"no such route"}' }));
    await page.goto(`${server.url}/admin`);
    await page.waitForSelector('#unavailable:has-text("stats unavailable")');
    await page.context().close();
  });

  test('chat: reconnect and a change of transport resume without loss or repeats', LIMIT, async () => {
    const room = 'controls';
    const alice = await openChat(browser, server.url, { name: 'alice', room, transport: 'sse' });
    const bob = await openChat(browser, server.url, { name: 'bob', room, transport: 'longpoll' });
    await send(alice, 'a1');
    await waitForMessages(bob, 1);

    await bob.click('#reconnect');
    await send(alice, 'a2');
    await bob.waitForSelector('#status[data-state="open"][data-transport="longpoll"]');
    await waitForMessages(bob, 2);

    await expectEndpoints(server.url);
    const switches = ['poll', 'ws', 'iframe', 'sse'];
    for (const transport of switches) {
      await bob.selectOption('#transport', transport);
      await send(alice, `while switching to ${transport}`);
      await bob.waitForSelector(`#status[data-state="open"][data-transport="${transport}"]`);
      assert.match(bob.url(), new RegExp(`transport=${transport}`), 'the choice is kept in the URL');
    }
    const n = 2 + switches.length + 1;
    await waitForMessages(bob, n - 1);
    await send(bob, 'b1');
    await waitForMessages(alice, n);
    const seen = await messages(bob);
    assert.deepEqual(seen.map(m => m.id), Array.from({ length: n }, (_, i) => i + 1));
    assert.deepEqual(await messages(alice), seen);
    assert.equal(await bob.textContent('#last-id'), String(n));
    assert.deepEqual(bob.errors, []);
    await alice.context().close();
    await bob.context().close();
  });
});
