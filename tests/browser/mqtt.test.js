// The chat over MQTT over WebSocket (MQTT.js, vendored, loaded only when used):
// an MQTT page chats with a WebSocket page and with another MQTT page, each
// message shown exactly once, in order, with its sender and time; a message
// published over HTTP reaches an MQTT page; and a filter works over MQTT.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  checkAssetsFresh, launchBrowser, messages, newPage, openChat, expectEndpoints, publish, send, startServer, waitForMessages, LIMIT,
} from './helpers.js';

/** Opens the chat and records the WebSockets and vendor requests the page makes. */
async function chat(browser, url, opts) {
  const sockets = [];
  const vendor = [];
  const page = await openChat(browser, url, {
    ...opts,
    before: p => {
      p.on('websocket', ws => sockets.push(new URL(ws.url()).pathname));
      p.on('request', r => { if (new URL(r.url()).pathname.startsWith('/vendor/')) vendor.push(new URL(r.url()).pathname); });
    },
  });
  page.sockets = sockets;
  page.vendor = vendor;
  // Every message object herald.js hands over from now on, as it came.
  await page.evaluate(c => {
    window.handed = [];
    window.herald.subscribe(c, m => window.handed.push(m));
  }, `chat/room/${opts.room}`);
  return page;
}

/** The chat's messages with the time each shows. */
const shown = page => page.$$eval('#messages .msg', els => els.map(el => ({
  id: Number(el.dataset.id),
  from: el.querySelector('.from').textContent,
  text: el.querySelector('.text').textContent,
  time: el.querySelector('.time').textContent,
})));

/** The room's history as the server has it (short poll since 0). */
async function history(url, room) {
  const res = await fetch(`${url}/api/channels/chat/room/${room}/messages?since=0`);
  return (await res.json()).messages.map(m => ({ channel: `chat/room/${room}`, ...m }));
}

describe('MQTT over WebSocket in the browser', () => {
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

  for (const [a, b] of [['mqtt', 'ws'], ['mqtt', 'mqtt']]) {
    test(`chat both ways, ${a} and ${b}`, LIMIT, async () => {
      const room = `mqtt-${a}-${b}`;
      const alice = await chat(browser, server.url, { name: 'alice', room, transport: a });
      const bob = await chat(browser, server.url, { name: 'bob', room, transport: b });

      await send(alice, 'hello bob');
      await waitForMessages(bob, 1);
      await send(bob, 'hi alice </b> & <i>friends</i>');
      await waitForMessages(alice, 2);
      // Both sides sending before the other has seen it.
      await Promise.all([send(alice, 'one'), send(bob, 'two')]);
      await Promise.all([send(alice, 'three'), send(bob, 'four')]);
      await Promise.all([waitForMessages(alice, 6), waitForMessages(bob, 6)]);
      // Anything late (a duplicate, say) would show up in this time.
      await new Promise(r => setTimeout(r, 500));

      const byAlice = await shown(alice);
      const byBob = await shown(bob);
      assert.deepEqual(byAlice.map(m => m.id), [1, 2, 3, 4, 5, 6], 'each message once, in id order');
      assert.deepEqual(byBob, byAlice, 'both pages show the same conversation');
      assert.deepEqual(byAlice.slice(0, 2).map(({ id, from, text }) => ({ id, from, text })), [
        { id: 1, from: 'alice', text: 'hello bob' },
        { id: 2, from: 'bob', text: 'hi alice </b> & <i>friends</i>' },
      ]);
      for (const m of byAlice) assert.match(m.time, /\d{1,2}\D\d{2}\D\d{2}/, 'each message shows its time');
      assert.deepEqual(new Set(byAlice.map(m => m.from)), new Set(['alice', 'bob']));

      // What herald.js handed over is exactly what the server stored: ids,
      // events, data and times, nothing twice.
      const stored = await history(server.url, room);
      assert.equal(stored.length, 6);
      for (const p of [alice, bob]) {
        assert.deepEqual(await p.evaluate(() => window.handed), stored);
        assert.equal(await p.textContent('#last-id'), '6');
      }
      assert.equal(await alice.locator('#messages .msg.mine').count(), 3, "alice's own messages are marked as hers");

      for (const [p, transport] of [[alice, a], [bob, b]]) {
        assert.equal(await p.getAttribute('#status', 'data-transport'), transport, 'still on the chosen transport');
        if (transport === 'mqtt') {
          assert.ok(p.sockets.includes('/mqtt'), 'an MQTT page talks to /mqtt');
          assert.ok(!p.sockets.includes('/api/ws'), 'and not to /api/ws');
          assert.deepEqual(p.vendor, ['/vendor/mqtt.min.js'], 'MQTT.js is loaded once');
        } else {
          assert.deepEqual(p.vendor, [], 'MQTT.js is not loaded unless MQTT is used');
        }
      }

      // A latecomer on MQTT first gets the history, then live messages.
      const carol = await chat(browser, server.url, { name: 'carol', room, transport: 'mqtt' });
      await waitForMessages(carol, 6);
      await send(carol, 'hi all');
      await Promise.all([alice, bob, carol].map(p => waitForMessages(p, 7)));
      assert.deepEqual((await shown(carol)).slice(0, 6), byAlice);
      assert.deepEqual(await messages(alice), await messages(carol));
      assert.deepEqual((await messages(bob))[6], { id: 7, from: 'carol', text: 'hi all' });

      for (const p of [alice, bob, carol]) {
        assert.deepEqual(p.errors, [], 'no uncaught errors in the page');
        await p.context().close();
      }
    });
  }

  test('a message published over HTTP reaches a page on MQTT', LIMIT, async () => {
    const room = 'mqtt-http';
    const dave = await chat(browser, server.url, { name: 'dave', room, transport: 'mqtt' });
    const id = await publish(server.url, `chat/room/${room}`, { from: 'backend', msg: 'from the server' }, 'chat');
    assert.equal(id, 1);
    await waitForMessages(dave, 1);
    const id2 = await publish(server.url, `chat/room/${room}`, 'plain text');
    await waitForMessages(dave, 2);
    const seen = await shown(dave);
    assert.deepEqual(seen.map(({ id, from, text }) => ({ id, from, text })), [
      { id: 1, from: 'backend', text: 'from the server' },
      { id: id2, from: 'server', text: 'plain text' },
    ]);
    assert.deepEqual(await dave.evaluate(() => window.handed), await history(server.url, room));
    assert.equal(await dave.getAttribute('#status', 'data-transport'), 'mqtt');
    assert.deepEqual(dave.errors, []);
    await dave.context().close();
  });

  test('a filter over MQTT', LIMIT, async () => {
    const page = await newPage(browser, server.url);
    await page.goto(server.url);
    await page.evaluate(async () => {
      const { Herald } = await import('/herald.js');
      window.got = [];
      window.h = new Herald(location.origin, { transports: ['mqtt'] });
      window.h.subscribe('feed/+', m => window.got.push([m.channel, m.id, m.data]));
    });
    await page.waitForFunction(() => window.h.state === 'open' && window.h.transport === 'mqtt');
    await publish(server.url, 'feed/a', 'a1');
    await page.waitForFunction(() => window.got.length === 1);
    await publish(server.url, 'feed/b', 'b1');
    await publish(server.url, 'feed/a', 'a2');
    await publish(server.url, 'other/a', 'not followed');
    await page.waitForFunction(() => window.got.length === 3);
    await new Promise(r => setTimeout(r, 300));
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.filter(g => g[0] === 'feed/a'), [['feed/a', 1, 'a1'], ['feed/a', 2, 'a2']]);
    assert.deepEqual(got.filter(g => g[0] === 'feed/b'), [['feed/b', 1, 'b1']]);
    assert.equal(got.length, 3);
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });
});
