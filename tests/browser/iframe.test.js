// The hidden-iframe transport carries hostile payloads as data: they arrive
// intact and no script of theirs runs, whether replayed or live, JSON or text.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launchBrowser, newPage, expectEndpoints, publish, startServer, LIMIT } from './helpers.js';

const CHANNEL = 'hostile/iframe';
const HOSTILE = [
  '</script><script>alert(1)</script>',
  '</SCRIPT ><script>parent.__pwned = "script"</script>',
  '<!--',
  '<!-- <script>',
  '-->',
  ']]>',
  '<![CDATA[ ]]>',
  '\u2028',
  '\u2029',
  'a\u2028b\u2029c',
  '<img src=x onerror="parent.__pwned = \'img\'">',
  `"'\` \\ \\u003c \\u2028 </`,
  '&lt; &amp; &#60;',
  '\u0000 \u001f \u{1F600}',
];

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

test('hostile payloads through the hidden iframe arrive intact and run nothing', LIMIT, async () => {
  const page = await newPage(browser, server.url);
  const dialogs = [];
  page.on('dialog', d => { dialogs.push(d.message()); d.dismiss(); });

  const expected = [];
  const send = async data => { await publish(server.url, CHANNEL, data); expected.push(data); };
  const half = HOSTILE.length / 2;
  // Some before the page subscribes (replayed history) ...
  for (const s of HOSTILE.slice(0, half)) await send(s);

  await page.goto(server.url);
  await page.evaluate(async channel => {
    const { Herald } = await import('/herald.js');
    window.got = [];
    window.h = new Herald(location.origin, { transports: ['iframe'] });
    window.h.subscribe(channel, m => window.got.push(m.data));
  }, CHANNEL);
  await page.waitForFunction(k => window.got.length >= k, half);
  assert.equal(await page.evaluate(() => window.h.transport), 'iframe');

  // ... and some live, plus all of them in one object and one as a text body.
  for (const s of HOSTILE.slice(half)) await send(s);
  await send({ all: HOSTILE, [HOSTILE[0]]: HOSTILE[1] });
  const res = await fetch(`${server.url}/api/channels/${CHANNEL}`, {
    method: 'POST', headers: { 'Content-Type': 'text/plain; charset=utf-8' }, body: HOSTILE.join('\n'),
  });
  assert.equal(res.status, 200);
  expected.push(HOSTILE.join('\n'));

  await page.waitForFunction(k => window.got.length >= k, expected.length);
  assert.deepEqual(await page.evaluate(() => window.got), expected, 'every payload arrives as the same data');
  assert.deepEqual(dialogs, [], 'no alert() ran');
  assert.equal(await page.evaluate(() => window.__pwned), undefined, 'no injected script ran');
  const injected = await page.evaluate(() => {
    const doc = document.querySelector('iframe').contentDocument;
    return { img: doc.querySelectorAll('img').length, scripts: [...doc.scripts].filter(s => !/^parent\.__herald_frame\d+\(/.test(s.text)).length };
  });
  assert.deepEqual(injected, { img: 0, scripts: 0 }, 'the stream holds only the callback scripts, no injected markup');
  assert.deepEqual(page.errors, [], 'no script error in the page');
});
