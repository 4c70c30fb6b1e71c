// herald.js's reconnect policy, run in Node (no browser or server needed: the
// parts that touch the network are replaced): the backoff grows, is capped
// and is jittered; a transport that fails while the server answers is given
// up after two strikes; a refusal by the server (4xx) costs it nothing.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Herald, HeraldError } from '../../crates/herald-server/assets/herald.js';

test('the backoff doubles from its base up to its cap, with equal jitter', () => {
  const h = new Herald('http://127.0.0.1:9', { backoffBase: 100, backoffMax: 1000 });
  for (const [failures, step] of [[1, 100], [2, 200], [3, 400], [4, 800], [5, 1000], [12, 1000]]) {
    h._failures = failures;
    const waits = Array.from({ length: 200 }, () => h._backoff());
    assert.ok(waits.every(w => w >= step / 2 && w <= step), `after ${failures} failures: within [${step / 2}, ${step}]`);
    assert.ok(new Set(waits.map(Math.round)).size > 20, `after ${failures} failures: spread, not fixed`);
  }
});

/** A client whose network parts are stubbed; `lose(err)` is one failed attempt. */
function client(reachable) {
  const h = new Herald('http://127.0.0.1:9', { transports: ['ws', 'sse', 'longpoll'] });
  const scheduled = [];
  h._disconnect = () => {};
  h._reachable = async () => reachable;
  h._schedule = ms => scheduled.push(ms);
  h.on('error', () => {});
  const lose = err => {
    const attempt = { name: h.transports[h._index], opened: false };
    h._attempt = attempt;
    return h._lost(attempt, err);
  };
  return { h, scheduled, lose };
}

test('two failures while the server answers move on to the next transport', async () => {
  const { h, lose } = client(true);
  await lose(new HeraldError('ws_closed', 'WebSocket closed (1006)'));
  assert.equal(h.transports[h._index], 'ws', 'one strike is not enough');
  await lose(new HeraldError('ws_closed', 'WebSocket closed (1006)'));
  assert.equal(h.transports[h._index], 'sse');
});

test('a refusal by the server keeps the transport and waits a backoff', async () => {
  const { h, scheduled, lose } = client(true);
  for (let i = 0; i < 4; i++) await lose(new HeraldError('missing_token', 'a token is required', 401));
  assert.equal(h.transports[h._index], 'ws', 'the transport is not to blame');
  assert.ok(scheduled.every(ms => ms >= 250), `no quick retries: ${scheduled}`);
});

test('while the server is out of reach no transport is blamed', async () => {
  const { h, lose } = client(false);
  for (let i = 0; i < 4; i++) await lose(new HeraldError('ws_closed', 'WebSocket closed (1006)'));
  assert.equal(h.transports[h._index], 'ws');
});
