// Two browser pages chat in both directions over each transport; a third page
// that joins later gets the room's history. Every page shows each message
// exactly once, in the same order.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  TRANSPORTS, checkAssetsFresh, launchBrowser, messages, openChat, expectEndpoints, send, startServer, waitForMessages, LIMIT,
} from './helpers.js';

describe('chat between two pages', () => {
  let server;
  let browser;

  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
    await expectEndpoints(server.url);
    await checkAssetsFresh(server.url);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  for (const transport of TRANSPORTS) {
    test(`over ${transport}`, LIMIT, async () => {
      const room = `room-${transport}`;
      const alice = await openChat(browser, server.url, { name: 'alice', room, transport });
      const bob = await openChat(browser, server.url, { name: 'bob', room, transport });

      await send(alice, 'hello bob');
      await waitForMessages(bob, 1);
      await send(bob, 'hi alice </b> & <i>friends</i>');
      await waitForMessages(alice, 2);
      // A quick exchange, both sides sending before the other has seen it.
      await Promise.all([send(alice, 'one'), send(bob, 'two')]);
      await Promise.all([send(alice, 'three'), send(bob, 'four')]);
      await Promise.all([waitForMessages(alice, 6), waitForMessages(bob, 6)]);

      const seenByAlice = await messages(alice);
      const seenByBob = await messages(bob);
      assert.deepEqual(seenByAlice.map(m => m.id), [1, 2, 3, 4, 5, 6], 'each message once, in id order');
      assert.deepEqual(seenByBob, seenByAlice, 'both pages show the same conversation');
      assert.deepEqual(seenByAlice.slice(0, 2), [
        { id: 1, from: 'alice', text: 'hello bob' },
        { id: 2, from: 'bob', text: 'hi alice </b> & <i>friends</i>' },
      ]);
      assert.equal(await alice.locator('#messages .msg.mine').count(), 3, "alice's own messages are marked as hers");
      assert.equal(await bob.textContent('#last-id'), '6');
      assert.equal(await alice.getAttribute('#status', 'data-transport'), transport, 'still on the chosen transport');

      // A latecomer first gets the history (since=0), then live messages.
      const carol = await openChat(browser, server.url, { name: 'carol', room, transport });
      await waitForMessages(carol, 6);
      await send(carol, 'hi all');
      await Promise.all([alice, bob, carol].map(p => waitForMessages(p, 7)));
      const seenByCarol = await messages(carol);
      assert.deepEqual(seenByCarol.slice(0, 6), seenByAlice);
      assert.deepEqual(seenByCarol[6], { id: 7, from: 'carol', text: 'hi all' });
      assert.equal((await messages(alice)).length, 7, 'nothing shown twice');

      for (const p of [alice, bob, carol]) {
        assert.deepEqual(p.errors, [], 'no uncaught errors in the page');
        await p.context().close();
      }
    });
  }
});
