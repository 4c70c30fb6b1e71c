// The browser's own EventSource against the single-channel SSE endpoint, with
// a server that ends every stream after 2 s: the browser reconnects by itself,
// sends Last-Event-ID, and misses nothing, including what is published while
// it is disconnected. No herald.js here: this is the endpoint as any SSE
// client sees it.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launchBrowser, newPage, publish, startServer, within, LIMIT } from './helpers.js';

const CHANNEL = 'native/sse';

let server;
let browser;
before(async () => {
  server = await startServer({ env: { HERALD_SSE_MAX_LIFETIME: '2s', HERALD_SSE_RETRY: '300ms' } });
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

test('EventSource reconnects with Last-Event-ID and misses nothing', LIMIT, async () => {
  const page = await newPage(browser, server.url);
  const published = []; // { id, n } in publish order
  let n = 0;
  const publishNext = async () => {
    const data = { n: ++n };
    published.push({ id: await publish(server.url, CHANNEL, data), n: data.n });
  };

  // The Last-Event-ID each (re)connection asked with.
  const resumes = [];
  page.on('request', req => {
    if (req.url().includes(`/api/channels/${CHANNEL}/events`)) resumes.push(req.allHeaders().then(h => h['last-event-id'] ?? null));
  });
  // Publish while the browser is between two streams.
  let publishing = true;
  const duringGaps = [];
  await page.exposeFunction('streamEnded', () => { if (publishing) duringGaps.push(publishNext()); });

  await page.goto(server.url);
  await publishNext(); // before the first connection: replayed from history
  await page.evaluate(channel => {
    window.got = [];
    window.opens = 0;
    const es = new EventSource(`/api/channels/${channel}/events`);
    es.onopen = () => { window.opens++; };
    es.onmessage = e => window.got.push({ lastEventId: e.lastEventId, data: JSON.parse(e.data) });
    es.onerror = () => window.streamEnded();
  }, CHANNEL);

  // Keep publishing until the browser has been through at least 3 streams.
  await within(20000, 'three streams', (async () => {
    while (await page.evaluate(() => window.opens) < 3 || n < 20) {
      await publishNext();
      await page.waitForTimeout(150); // pacing the publisher, not synchronisation
    }
  })());
  publishing = false;
  await Promise.all(duringGaps);

  await page.waitForFunction(k => window.got.length >= k, published.length, { timeout: 10000 });
  const got = await page.evaluate(() => window.got);
  assert.deepEqual(
    got.map(m => [Number(m.lastEventId), m.data.n]),
    published.map(p => [p.id, p.n]),
    'every message once, in order, across the reconnects',
  );
  assert.ok(duringGaps.length >= 2, `published while disconnected ${duringGaps.length} times`);

  const headers = await Promise.all(resumes);
  assert.equal(headers[0], null, 'the first connection has no Last-Event-ID');
  const later = headers.slice(1);
  assert.ok(later.length >= 2, `reconnected ${later.length} times`);
  for (const h of later) assert.match(h ?? '', /^\d+$/, 'each reconnection sends the last id it had');
  assert.deepEqual(page.errors, []);
});
