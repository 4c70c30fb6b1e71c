// With WebSocket blocked, a chat page that prefers 'ws' falls back to the next
// transport ('sse') and still chats both ways with a page that is not blocked.
// Three ways of being blocked: the connection fails (a firewall), the
// constructor throws (a content security policy), and the socket opens but is
// cut at once (a proxy that accepts the upgrade and then drops it).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { launchBrowser, messages, openChat, expectEndpoints, send, startServer, waitForMessages, LIMIT } from './helpers.js';

/** Init scripts replacing window.WebSocket; each counts attempts in window.__wsAttempts. */
const FAILS = () => {
  window.__wsAttempts = 0;
  window.WebSocket = class BlockedWebSocket extends EventTarget {
    static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
    constructor(url) {
      super();
      window.__wsAttempts++;
      this.url = url;
      this.readyState = 0;
      setTimeout(() => {
        this.readyState = 3;
        this.onerror?.(new Event('error'));
        this.onclose?.(new CloseEvent('close', { code: 1006, wasClean: false }));
      }, 20);
    }
    send() { throw new DOMException('still connecting', 'InvalidStateError'); }
    close() { this.readyState = 3; }
  };
};
const THROWS = () => {
  window.__wsAttempts = 0;
  const Native = window.WebSocket;
  window.WebSocket = function BlockedWebSocket() {
    window.__wsAttempts++;
    throw new DOMException("Refused to connect: violates the Content Security Policy directive 'connect-src'", 'SecurityError');
  };
  Object.assign(window.WebSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3, prototype: Native.prototype });
};

describe('falling back when WebSocket is blocked', () => {
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

  const cases = [
    ['the connection fails', { init: FAILS }],
    ['the constructor throws', { init: THROWS }],
    ['the socket is cut right after opening', { cut: true }],
  ];
  for (const [name, { init, cut }] of cases) {
    test(name, LIMIT, async () => {
      const room = `fallback-${name.replace(/\W+/g, '-')}`;
      const bob = await openChat(browser, server.url, { name: 'bob', room, transport: 'ws' });

      let cuts = 0;
      const alice = await openChat(browser, server.url, {
        name: 'alice', room, transport: 'ws', expectTransport: 'sse',
        init: init && `(${init})()`,
        before: cut && (page => page.routeWebSocket(/\/api\/ws/, ws => { cuts++; ws.close({ code: 1011, reason: 'proxy says no' }); })),
      });
      if (init) assert.ok(await alice.evaluate(() => window.__wsAttempts) >= 1, 'WebSocket was tried first');
      if (cut) assert.ok(cuts >= 1, 'WebSocket was tried first');

      await send(alice, 'from the blocked side');
      await waitForMessages(bob, 1);
      await send(bob, 'from the open side');
      await waitForMessages(alice, 2);
      const expected = [
        { id: 1, from: 'alice', text: 'from the blocked side' },
        { id: 2, from: 'bob', text: 'from the open side' },
      ];
      assert.deepEqual(await messages(alice), expected);
      assert.deepEqual(await messages(bob), expected);
      assert.equal(await alice.getAttribute('#status', 'data-transport'), 'sse', 'alice stays on the fallback');
      assert.deepEqual(alice.errors, []);
      await alice.context().close();
      await bob.context().close();
    });
  }
});
