// When history no longer holds what a client asks for, herald.js says so with
// a 'gap' event naming the lost ids, then delivers what is retained, on every
// transport: the application can tell "recovered" from "lost some".

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { TRANSPORTS, launchBrowser, newPage, expectEndpoints, publish, startServer, LIMIT } from './helpers.js';

describe('gaps', () => {
  let server;
  let browser;
  before(async () => {
    server = await startServer({ env: { HERALD_HISTORY_SIZE: '3' } });
    browser = await launchBrowser();
    await expectEndpoints(server.url);
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  for (const transport of TRANSPORTS) {
    test(`over ${transport}`, LIMIT, async () => {
      const channel = `gap/${transport}`;
      for (let i = 1; i <= 10; i++) await publish(server.url, channel, i);
      const page = await newPage(browser, server.url);
      await page.goto(server.url);
      await page.evaluate(async ({ transport, channel }) => {
        const { Herald } = await import('/herald.js');
        window.got = [];
        window.gaps = [];
        window.h = new Herald(location.origin, { transports: [transport] });
        window.h.on('gap', g => window.gaps.push(g));
        window.h.subscribe(channel, m => window.got.push(m.id), { since: 2 });
      }, { transport, channel });
      await page.waitForFunction(() => window.got.length >= 3);
      await publish(server.url, channel, 11);
      await page.waitForFunction(() => window.got.length >= 4);
      assert.deepEqual(await page.evaluate(() => window.gaps), [{ channel, from: 3, to: 7 }]);
      assert.deepEqual(await page.evaluate(() => window.got), [8, 9, 10, 11]);
      assert.equal(await page.evaluate(c => window.h.lastId(c), channel), 11);
      await page.context().close();
    });
  }
});
