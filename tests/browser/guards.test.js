// The browser's own EventSource against a server whose connection limits
// refuse it. A native EventSource gives up for good on any answer but 200,
// so Herald refuses in band: 200, `retry:` the wait, one `event: error` with
// the JSON error, end of stream. The browser then comes back by itself after
// the wait (with its Last-Event-ID when it had one) and misses nothing.
// Chromium and this test both connect from 127.0.0.1, so the servers here
// exempt no address.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launchBrowser, newPage, publish, startServer, within, LIMIT } from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/** Opens an EventSource in the page as `window[name]`, recording messages and in-band refusals. */
function open(page, name, url) {
  return page.evaluate(([name, url]) => {
    const rec = window[name] = { got: [], refusals: [], opens: 0 };
    rec.es = new EventSource(url);
    rec.es.onopen = () => { rec.opens++; };
    rec.es.onmessage = e => rec.got.push({ id: Number(e.lastEventId), data: JSON.parse(e.data) });
    // The browser's own connection errors carry no data; a refusal does.
    rec.es.addEventListener('error', e => { if (e.data) rec.refusals.push(JSON.parse(e.data)); });
  }, [name, url]);
}

const read = (page, name) => page.evaluate(n => ({ got: window[n].got, refusals: window[n].refusals, opens: window[n].opens }), name);

test('an EventSource over the address limit is refused in band, comes back after the wait, and misses nothing', LIMIT, async () => {
  const server = await startServer({ env: {
    HERALD_LIMITS_EXEMPT: '',
    HERALD_LIMITS_CONNECTIONS_PER_IP: '1',
    HERALD_LIMITS_CONNECTIONS_RETRY_AFTER: '1s',
  } });
  try {
    const channel = 'limits/per-ip';
    const page = await newPage(browser, server.url);
    await page.goto(server.url);
    const published = [await publish(server.url, channel, { n: 1 })];
    await open(page, 'a', `/api/channels/${channel}/events`);
    await page.waitForFunction(() => window.a.got.length === 1, null, { timeout: 10000 });

    // The address's one connection is taken: the second stream is refused.
    await open(page, 'b', `/api/channels/${channel}/events`);
    await page.waitForFunction(() => window.b.refusals.length >= 1, null, { timeout: 10000 });
    const [refusal] = (await read(page, 'b')).refusals;
    assert.equal(refusal.code, 'too_many_connections');
    assert.equal(refusal.limit, 'connections_per_ip');
    assert.ok(refusal.retry_after >= 1 && refusal.retry_after < 1.5, `the configured wait, with jitter: ${refusal.retry_after}`);

    // Messages come while it waits; then the first stream goes away.
    published.push(await publish(server.url, channel, { n: 2 }), await publish(server.url, channel, { n: 3 }));
    await page.evaluate(() => window.a.es.close());
    await page.waitForFunction(k => window.b.got.length >= k, published.length, { timeout: 15000 });
    published.push(await publish(server.url, channel, { n: 4 }));
    await page.waitForFunction(k => window.b.got.length >= k, published.length, { timeout: 10000 });

    const b = await read(page, 'b');
    assert.deepEqual(b.got.map(m => [m.id, m.data.n]), published.map((id, i) => [id, i + 1]), 'every message once, in order');
    assert.ok(b.refusals.length >= 1 && b.refusals.every(r => r.code === 'too_many_connections'));
    assert.equal(b.opens, b.refusals.length + 1, 'each refusal was a 200 the browser opened, then came back from');
    assert.deepEqual(page.errors, []);
  } finally {
    await server.stop();
  }
});

test('an EventSource refused for its connection rate comes back with its Last-Event-ID and misses nothing', LIMIT, async () => {
  // One new connection per 3 s from the address, and streams that end after
  // a second: each reconnection 200 ms later is refused until the rate allows.
  const server = await startServer({ env: {
    HERALD_LIMITS_EXEMPT: '',
    HERALD_LIMITS_CONNECTIONS_RATE_PER_IP: '1/3s',
    HERALD_SSE_MAX_LIFETIME: '1s',
    HERALD_SSE_RETRY: '200ms',
  } });
  try {
    const channel = 'limits/rate';
    const page = await newPage(browser, server.url);
    const resumes = []; // the Last-Event-ID of every (re)connection
    page.on('request', req => {
      if (req.url().includes(`/api/channels/${channel}/events`)) resumes.push(req.allHeaders().then(h => h['last-event-id'] ?? null));
    });
    await page.goto(server.url);
    const published = [];
    let n = 0;
    const publishNext = async () => { const data = { n: ++n }; published.push({ id: await publish(server.url, channel, data), n: data.n }); };

    await publishNext();
    await open(page, 'es', `/api/channels/${channel}/events`);
    // Publish through at least two refusals and three streams.
    await within(40000, 'two refusals and three streams', (async () => {
      for (;;) {
        const s = await read(page, 'es');
        if (s.refusals.length >= 2 && s.opens - s.refusals.length >= 3) break;
        await publishNext();
        await page.waitForTimeout(150); // pacing the publisher, not synchronisation
      }
    })());
    await page.waitForFunction(k => window.es.got.length >= k, published.length, { timeout: 15000 });

    const s = await read(page, 'es');
    assert.deepEqual(s.got.map(m => [m.id, m.data.n]), published.map(p => [p.id, p.n]), 'every message once, in order');
    for (const r of s.refusals) {
      assert.equal(r.code, 'rate_limited');
      assert.equal(r.limit, 'connection_rate');
      assert.ok(r.retry_after > 0 && r.retry_after <= 3, `a wait within the rate's period: ${r.retry_after}`);
    }
    const headers = await Promise.all(resumes);
    assert.equal(headers[0], null, 'the first connection has no Last-Event-ID');
    assert.ok(headers.length >= 5, `${headers.length} connections`);
    for (const h of headers.slice(1)) assert.match(h ?? '', /^\d+$/, 'every reconnection, refused or not, sends the last id it had');
    assert.deepEqual(page.errors, []);
  } finally {
    await server.stop();
  }
});
