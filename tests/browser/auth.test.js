// With auth configured, herald.js carries the user's token on every transport
// (a header where it can, ?token= where the browser API cannot set one); a
// client without a token is refused and told why.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { BIN, TRANSPORTS, launchBrowser, newPage, expectEndpoints, startServer, LIMIT } from './helpers.js';

const SECRET = 'browser-test-secret-that-is-long-enough';

describe('a server with auth', () => {
  let server;
  let browser;
  let token;
  before(async () => {
    server = await startServer({ env: { HERALD_AUTH_JWT_SECRET: SECRET } });
    browser = await launchBrowser();
    await expectEndpoints(server.url);
    token = execFileSync(BIN, ['token', '--sub', 'alice', '--channels', 'chat/#', '--publish', 'chat/#'], {
      env: { ...process.env, HERALD_AUTH_JWT_SECRET: SECRET }, encoding: 'utf8',
    }).trim();
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  /** Opens a page whose Herald follows `channel` over `transport` only; returns the page. */
  async function client(transport, channel, tokenToUse) {
    const page = await newPage(browser, server.url);
    await page.goto(server.url);
    await page.evaluate(async ({ transport, channel, token }) => {
      const { Herald } = await import('/herald.js');
      window.got = [];
      window.errors = [];
      window.h = new Herald(location.origin, { token, transports: [transport] });
      window.h.on('error', e => window.errors.push(e.code));
      window.h.subscribe(channel, m => window.got.push(m.data));
    }, { transport, channel, token: tokenToUse });
    return page;
  }

  for (const transport of TRANSPORTS) {
    test(`a token works over ${transport}`, LIMIT, async () => {
      const channel = `chat/auth/${transport}`;
      const page = await client(transport, channel, token);
      await page.waitForFunction(t => window.h.state === 'open' && window.h.transport === t, transport);
      const id = await page.evaluate(c => window.h.publish(c, { hello: 'from alice' }), channel);
      assert.equal(id, 1);
      await page.waitForFunction(() => window.got.length === 1);
      assert.deepEqual(await page.evaluate(() => window.got), [{ hello: 'from alice' }]);
      assert.deepEqual(page.errors, []);
      await page.context().close();
    });
  }

  test('without a token the client is refused and told why', LIMIT, async () => {
    const page = await client('longpoll', 'chat/auth/none', null);
    await page.waitForFunction(() => window.errors.includes('missing_token'));
    assert.notEqual(await page.evaluate(() => window.h.state), 'open');
    const refused = await page.evaluate(() => window.h.publish('chat/auth/none', 1).then(() => null, e => [e.code, e.status]));
    assert.deepEqual(refused, ['missing_token', 401]);
    await page.context().close();
  });

  test('the chat page: refused without a token, chats once one is pasted', LIMIT, async () => {
    const page = await newPage(browser, server.url);
    await page.goto(`${server.url}/chat?room=tokens&transport=ws`);
    await page.waitForSelector('#error:not([hidden])');
    assert.match(await page.textContent('#error'), /needs a token/);
    assert.notEqual(await page.getAttribute('#status', 'data-state'), 'open');
    await page.fill('#token', token);
    await page.dispatchEvent('#token', 'change');
    await page.waitForSelector('#status[data-state="open"][data-transport="ws"]');
    assert.equal(await page.inputValue('#name'), 'alice', 'the name comes from the token');
    await page.fill('#text', 'hello with a token');
    await page.click('#send');
    await page.waitForSelector('#messages .msg .text');
    assert.equal(await page.textContent('#messages .msg .from'), 'alice');
    assert.equal(await page.textContent('#messages .msg .text'), 'hello with a token');
    await page.context().close();

    // ?token= works too, on every page load, with no typing.
    const linked = await newPage(browser, server.url);
    await linked.goto(`${server.url}/chat?room=tokens&transport=sse&token=${token}`);
    await linked.waitForSelector('#status[data-state="open"][data-transport="sse"]');
    await linked.waitForFunction(() => document.querySelectorAll('#messages .msg').length === 1);
    await linked.context().close();
  });

  test('a channel outside the token is refused', LIMIT, async () => {
    const page = await client('poll', 'other/secret', token);
    await page.waitForFunction(() => window.errors.includes('forbidden'));
    const refused = await page.evaluate(t => window.h.publish('other/secret', 1).then(() => null, e => e.code));
    assert.equal(refused, 'forbidden');
    await page.context().close();
  });
});
