// herald.js reports an inbox's unread count (the red dot) on every transport:
// the current count when it subscribes, then each change, whether a new
// notification or a read on another device.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { TRANSPORTS, launchBrowser, newPage, expectEndpoints, startServer, LIMIT } from './helpers.js';

describe('unread counts', () => {
  let server;
  let browser;
  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
    await expectEndpoints(server.url);
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  const post = async (path, body) => {
    const res = await fetch(`${server.url}${path}`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    assert.ok(res.ok, `${path}: ${res.status} ${await res.text()}`);
  };

  for (const transport of TRANSPORTS) {
    test(`over ${transport}`, LIMIT, async () => {
      const user = `reader-${transport}`;
      await post('/api/notifications', { users: [user], title: 'waiting', body: '' });
      const page = await newPage(browser, server.url);
      await page.goto(server.url);
      await page.evaluate(async ({ transport, user }) => {
        const { Herald } = await import('/herald.js');
        window.counts = [];
        window.got = [];
        window.h = new Herald(location.origin, { transports: [transport] });
        window.h.on('unread', n => window.counts.push(n));
        window.h.subscribe(`user/${user}`, m => window.got.push(m.event));
      }, { transport, user });
      const countsAre = expected => page.waitForFunction(e => JSON.stringify(window.counts) === JSON.stringify(e), expected);

      await countsAre([1]); // the count on subscribe
      await post('/api/notifications', { users: [user], title: 'new', body: '' });
      await countsAre([1, 2]);
      await post(`/api/users/${user}/read`, { all: true }); // read elsewhere
      await countsAre([1, 2, 0]);
      assert.deepEqual(await page.evaluate(() => window.got), ['notification', 'notification']);
      assert.equal(await page.evaluate(() => window.h.transport), transport);
      assert.deepEqual(page.errors, []);
      await page.context().close();
    });
  }
});
