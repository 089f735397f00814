// The load, on its own worker thread (its own event loop), like the Rust
// example's client thread: 2 x cores heavy requests in flight, and a /health
// probe every 5 ms whose latency is recorded.
'use strict';
const http = require('node:http');
const { workerData, parentPort } = require('node:worker_threads');

const { port, inFlight, seconds } = workerData;
const agent = new http.Agent({ keepAlive: true, maxSockets: inFlight + 4 });

function get(path) {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode === 200));
    });
    req.on('error', () => resolve(false));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const start = performance.now();
  const end = start + seconds * 1000;
  let heavyDone = 0;
  const heavy = Array.from({ length: inFlight }, async () => {
    while (performance.now() < end) {
      if (await get('/heavy')) heavyDone++;
    }
  });
  await sleep(300);
  const health = [];
  let next = performance.now();
  while (performance.now() < end) {
    next += 5;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    const sent = performance.now();
    if (await get('/health')) health.push(performance.now() - sent);
  }
  await Promise.all(heavy);
  const elapsed = (performance.now() - start) / 1000;
  parentPort.postMessage({ health, heavyDone, elapsed });
  agent.destroy();
})();
