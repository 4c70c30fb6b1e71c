// The bell page logged in as a user: the red dot comes from the server's
// count, lights in every tab of the user, clears in all of them when read in
// one, covers group notifications, and never shows another user's. Without
// open mode the page asks for a token instead of a development one.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import net from 'node:net';
import { launchBrowser, newContext, newPage, startServer, LIMIT } from './helpers.js';

describe('bell: logged in as a user', () => {
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

  /** A backend call (open mode: no credentials); resolves to the answer's JSON. */
  const call = async (method, path, body) => {
    const res = await fetch(`${server.url}${path}`, { method, headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    const text = await res.text();
    assert.ok(res.ok, `${method} ${path}: ${res.status} ${text}`);
    return JSON.parse(text);
  };
  const notify = body => call('POST', '/api/notifications', body);

  /** Opens the bell page in `page`, logs in as `user` through the form and waits until connected. */
  async function logIn(page, user) {
    if (!page.errors) { // a page of a shared context, not from newPage()
      page.errors = [];
      page.on('pageerror', e => page.errors.push(e));
    }
    await page.goto(`${server.url}/bell?user=`);
    await page.fill('#user', user);
    await page.click('#login');
    await page.waitForSelector('#status[data-state="open"]', { timeout: 15000 });
    assert.equal(await page.textContent('#who'), user);
    assert.match(page.url(), new RegExp(`user=${user}$`), 'the user is kept in the address');
    return page;
  }
  const items = page => page.$$eval('#list .item', els => els.map(el => ({
    id: el.dataset.id, title: el.querySelector('.title').textContent, unread: el.classList.contains('unread'),
  })));
  /** Waits for `selector` in the page, shown or not (the list is inside the closed panel). */
  const has = (page, selector) => page.waitForSelector(selector, { state: 'attached' });
  const dotIs = (page, n) => (n === 0 ? page.waitForSelector('#badge', { state: 'hidden' }) : page.waitForSelector(`#badge:text-is("${n}")`));

  test('two tabs of one user: the dot lights in both and clears in both when read in one', LIMIT, async () => {
    const context = await newContext(browser, server.url);
    const [a, b] = [await context.newPage(), await context.newPage()];
    await logIn(a, 'tess');
    await logIn(b, 'tess');
    assert.equal(await a.isHidden('#badge'), true, 'nothing unread yet');

    const { id } = await notify({ users: ['tess'], title: 'Build finished', body: 'main is green' });
    await Promise.all([dotIs(a, 1), dotIs(b, 1)]);
    for (const p of [a, b]) {
      await has(p, `#list .item.unread[data-id="user/tess:${id}"]`);
      assert.deepEqual(await items(p), [{ id: `user/tess:${id}`, title: 'Build finished', unread: true }]);
    }

    await a.click('#bell'); // opening the bell reads everything ...
    await dotIs(b, 0); // ... in every tab
    await has(b, '#list .item:not(.unread)');
    assert.deepEqual(await call('GET', '/api/users/tess/unread'), { count: 0 });

    // While the list is open, a new one stays unread until clicked.
    await notify({ users: ['tess'], title: 'Review requested', body: '#42' });
    await Promise.all([dotIs(a, 1), dotIs(b, 1)]);
    await a.click('#list .item.unread .title:text-is("Review requested")');
    await Promise.all([dotIs(a, 0), dotIs(b, 0)]);
    assert.equal(await a.isVisible('#panel'), true, 'the list stays open');

    // "Mark all read" reads several at once.
    await notify({ users: ['tess'], title: 'three' });
    await notify({ users: ['tess'], title: 'four' });
    await Promise.all([dotIs(a, 2), dotIs(b, 2)]);
    await a.click('#mark-all'); // a's list is still open
    await Promise.all([dotIs(a, 0), dotIs(b, 0)]);
    await b.waitForFunction(() => document.querySelectorAll('#list .item').length === 4 && !document.querySelector('#list .item.unread'));
    assert.deepEqual((await items(b)).map(i => i.title), ['four', 'three', 'Review requested', 'Build finished'], 'newest first');
    assert.deepEqual([...a.errors, ...b.errors], []);
    await context.close();
  });

  test('a group notification lights the dot and shows in the list', LIMIT, async () => {
    await call('PUT', '/api/groups/g/members', { users: ['gus'] });
    const page = await logIn(await newPage(browser, server.url), 'gus');
    const { id } = await notify({ group: 'g', title: 'Stand-up in 5', body: 'room 2' });
    await dotIs(page, 1);
    await has(page, `#list .item.unread[data-id="$group/g:${id}"]`);
    assert.equal(await page.textContent(`#list .item[data-id="$group/g:${id}"] .tag`), 'group g');
    await page.click('#bell');
    await dotIs(page, 0);
    assert.deepEqual(await call('GET', '/api/users/gus/unread'), { count: 0 });
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });

  test("one user's tab never shows another user's notification", LIMIT, async () => {
    const alice = await logIn(await newPage(browser, server.url), 'alice');
    const bob = await logIn(await newPage(browser, server.url), 'bob');
    await notify({ users: ['alice'], title: 'for alice only' });
    await dotIs(alice, 1);
    await has(alice, '#list .item .title:text-is("for alice only")');
    await notify({ users: ['bob'], title: 'for bob' }); // bob's tab is live and current ...
    await dotIs(bob, 1);
    await has(bob, '#list .item .title:text-is("for bob")');
    assert.deepEqual((await items(bob)).map(i => i.title), ['for bob'], "... and shows none of alice's");
    // Bob's token may not read alice's inbox either.
    const status = await bob.evaluate(async () => (await fetch('/api/users/alice/notifications', { headers: { Authorization: `Bearer ${window.herald.token}` } })).status);
    assert.equal(status, 403);
    assert.deepEqual([...alice.errors, ...bob.errors], []);
    await alice.context().close();
    await bob.context().close();
  });

  test('without development tokens the page asks for a token, and logs in with it', LIMIT, async () => {
    const { token } = await call('GET', '/api/dev/token?sub=tina');
    const page = await newPage(browser, server.url);
    // As a server with auth configured answers.
    await page.route('**/api/dev/token?*', route => route.fulfill({ status: 404, contentType: 'application/json', body: '{"code":"not_found","message":"no such route"}' }));
    await page.goto(`${server.url}/bell?user=tina`);
    assert.equal(await page.isHidden('#token-field'), true);
    await page.click('#login');
    await page.waitForSelector('#login-error:has-text("token from your application")');
    assert.equal(await page.isVisible('#token-field'), true);
    assert.equal(await page.isHidden('#bell-card'), true, 'not logged in');

    await page.fill('#token', token);
    await page.click('#login');
    await page.waitForSelector('#status[data-state="open"]');
    await notify({ users: ['tina'], title: 'hello tina' });
    await dotIs(page, 1);
    assert.doesNotMatch(page.url(), /token=/);

    await page.click('#logout');
    await page.waitForSelector('#login-card');
    assert.equal(await page.inputValue('#user'), 'tina');
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });
});

// The demo of unread fallback: the server is started as the README's one-liner
// does, with its webhooks going to the open-mode receiver on the server itself.
// A notification left unread is followed, after the demo's short delay (?fallback=),
// by what was sent for it (that one read in time sends nothing is shown in
// tests/outbound, against a real receiver).
describe('bell: unread fallback', () => {
  let server;
  let browser;
  before(async () => {
    const port = await freePort();
    server = await startServer({
      port,
      env: {
        HERALD_FALLBACK_ENABLED: 'true',
        HERALD_FALLBACK_CHANNELS: 'webhook',
        HERALD_WEBHOOKS_URL: `http://127.0.0.1:${port}/api/dev/webhook`,
        HERALD_WEBHOOKS_SECRET: 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD',
      },
    });
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  test('left unread: the page shows the webhook sent for it', LIMIT, async () => {
    const page = await newPage(browser, server.url);
    await page.goto(`${server.url}/bell?user=&fallback=1s`);
    await page.fill('#user', 'lena');
    await page.click('#login');
    await page.waitForSelector('#status[data-state="open"]', { timeout: 15000 });
    await page.waitForSelector('#fallback-row:not([hidden])');
    assert.equal(await page.textContent('#fallback-delay'), '1s');
    await page.fill('#title', 'Left unread');
    await page.click('#notify');
    await page.waitForSelector('#badge:text-is("1")');
    // Moments later: what was sent, and the notification marked with it.
    const sent = await page.waitForSelector('#sent li.delivery[data-via="webhook"][data-outcome="sent"]', { timeout: 20000 });
    assert.match(await sent.textContent(), /Webhook · sent · 1 notification/);
    await page.waitForSelector('#list .item .tag:text-is("sent by webhook")', { state: 'attached' });
    const [d] = (await (await fetch(`${server.url}/api/users/lena/deliveries`)).json()).deliveries;
    assert.equal(await sent.getAttribute('data-id'), d.id, 'the page lists the server\'s delivery');
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });
});

/** A loopback port nothing listens on right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}
