// A page that is cut off while another keeps sending shows, once it is back,
// every message exactly once and in order: after a server restart on the same
// data directory, and after its own network went away. One reader page per
// transport the server has.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  TRANSPORTS, launchBrowser, messages, openChat, expectEndpoints, send, startServer, tempDir, waitForMessages, LIMIT,
} from './helpers.js';

const TEXTS = ['one', 'two', 'three', 'four', 'five', 'six'];

/** Every page shows exactly `texts`, from alice, with ids 1..n. */
async function assertConversation(pages, texts) {
  const expected = texts.map((text, i) => ({ id: i + 1, from: 'alice', text }));
  for (const p of pages) {
    const who = new URL(p.url()).searchParams.get('name');
    assert.deepEqual(await messages(p), expected, `${who} (on ${await p.getAttribute('#status', 'data-transport')})`);
    assert.deepEqual(p.errors, [], 'no uncaught errors in the page');
  }
}

describe('resuming after being cut off', () => {
  let browser;
  before(async () => { browser = await launchBrowser(); });
  after(async () => { await browser?.close(); });

  // SIGTERM: a graceful restart, streams end cleanly. SIGKILL: connections are
  // cut mid-stream and nothing acknowledged may be lost. A hidden iframe cannot
  // see a cut connection (Chromium keeps the document "loading" and fires no
  // event) until its 45 s stall timeout, so it sits out the SIGKILL round.
  for (const signal of ['SIGTERM', 'SIGKILL']) {
    test(`a server restart (${signal}) on the same data directory`, LIMIT, async () => {
      const data = tempDir();
      let server = await startServer({ data: data.dir });
      try {
        await expectEndpoints(server.url);
        const transports = TRANSPORTS.filter(t => !(signal === 'SIGKILL' && t === 'iframe'));
        const alice = await openChat(browser, server.url, { name: 'alice', room: 'restart', transport: 'sse' });
        const readers = await Promise.all(transports.map(transport =>
          openChat(browser, server.url, { name: `reader-${transport}`, room: 'restart', transport })));

        for (const text of TEXTS.slice(0, 3)) await send(alice, text);
        await Promise.all(readers.map(p => waitForMessages(p, 3)));

        const port = server.port;
        await server.stop(signal);
        // Every reader notices (for short polling, at its next poll).
        await Promise.all(readers.map(p => p.waitForSelector('#status:not([data-state="open"])', { timeout: 10000 })));
        server = await startServer({ data: data.dir, port });

        // Alice goes on while the readers are still on their way back.
        for (const text of TEXTS.slice(3)) await send(alice, text);
        await Promise.all([alice, ...readers].map(p => waitForMessages(p, 6, 20000)));
        for (const [i, p] of readers.entries()) {
          await p.waitForSelector(`#status[data-state="open"][data-transport="${transports[i]}"]`);
        }
        await assertConversation([alice, ...readers], TEXTS);
        for (const p of [alice, ...readers]) await p.context().close();
      } finally {
        await server.stop();
        data.remove();
      }
    });
  }

  test('a reader that went offline', LIMIT, async () => {
    const server = await startServer();
    try {
      await expectEndpoints(server.url);
      const transports = TRANSPORTS;
      const alice = await openChat(browser, server.url, { name: 'alice', room: 'offline', transport: 'sse' });
      const readers = await Promise.all(transports.map(transport =>
        openChat(browser, server.url, { name: `reader-${transport}`, room: 'offline', transport })));
      await send(alice, TEXTS[0]);
      await Promise.all(readers.map(p => waitForMessages(p, 1)));

      // Cut every reader off and make it drop its connection.
      for (const p of readers) {
        await p.context().setOffline(true);
        await p.click('#reconnect');
        await p.waitForSelector('#status[data-state="reconnecting"]');
      }
      for (const text of TEXTS.slice(1)) await send(alice, text);
      await waitForMessages(alice, TEXTS.length);
      for (const p of readers) {
        assert.equal((await messages(p)).length, 1, 'a reader that is offline gets nothing');
      }

      for (const p of readers) await p.context().setOffline(false);
      await Promise.all(readers.map(p => waitForMessages(p, TEXTS.length, 20000)));
      await Promise.all(readers.map(p => p.waitForSelector('#status[data-state="open"]')));
      await assertConversation([alice, ...readers], TEXTS);
      for (const p of [alice, ...readers]) await p.context().close();
    } finally {
      await server.stop();
    }
  });
});
