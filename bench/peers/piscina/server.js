// Node.js 20 + Piscina peer of crates/corral/examples/event_loop.rs.
// One event loop serves GET /health and GET /heavy; /heavy runs on a Piscina
// pool with one thread per core. A client on a worker thread drives the load.
// The last stdout line is the same JSON as the Rust example's.
'use strict';
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const { Worker } = require('node:worker_threads');
const Piscina = require('piscina');

const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : fallback;
};
const seconds = flag('seconds', 5);
const records = flag('records', 50000);
const threads = os.availableParallelism();

const pool = new Piscina({
  filename: path.join(__dirname, 'worker.js'),
  minThreads: threads,
  maxThreads: threads,
});

const server = http.createServer(async (req, res) => {
  if (req.url === '/health') {
    res.end('ok');
  } else if (req.url === '/heavy') {
    try {
      res.end(await pool.run(records));
    } catch (err) {
      res.statusCode = 503;
      res.setHeader('Retry-After', '1');
      res.end(String(err));
    }
  } else {
    res.statusCode = 404;
    res.end();
  }
});
server.keepAliveTimeout = 60000;

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const client = new Worker(path.join(__dirname, 'client.js'), {
    workerData: { port, inFlight: 2 * Math.max(threads, 2), seconds },
  });
  client.once('message', async ({ health, heavyDone, elapsed }) => {
    health.sort((a, b) => a - b);
    const q = (p) => health[Math.min(health.length - 1, Math.ceil(p * health.length) - 1)] || 0;
    const line = {
      mode: 'piscina',
      health_p50_ms: +q(0.5).toFixed(2),
      health_p99_ms: +q(0.99).toFixed(2),
      health_max_ms: +(health[health.length - 1] || 0).toFixed(2),
      heavy_per_s: +(heavyDone / elapsed).toFixed(1),
    };
    await client.terminate();
    server.close();
    server.closeAllConnections();
    await pool.destroy();
    console.log(JSON.stringify(line).replace(/":/g, '": ').replace(/,"/g, ', "'));
  });
});
