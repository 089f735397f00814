// The comparison peer for accept-and-pass balancing: Node's own cluster
// module with its default round-robin scheduling (the primary accepts and
// passes each connection to a worker), answering like corral's hello example.
//
// Usage: node server.js WORKERS   (prints "listening on http://127.0.0.1:PORT")
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

cluster.schedulingPolicy = cluster.SCHED_RR;
const workers = Number(process.argv[2] || require('node:os').availableParallelism());

if (cluster.isPrimary) {
  let ready = 0;
  for (let i = 0; i < workers; i++) {
    cluster.fork({ SLOT: String(i) }).on('message', (msg) => {
      if (msg && msg.port && ++ready === workers) {
        console.log(`node-cluster: listening on http://127.0.0.1:${msg.port} (${workers} workers, balance=round-robin)`);
      }
    });
  }
  const stop = () => { for (const id in cluster.workers) cluster.workers[id].kill(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const body = `hello from worker ${process.env.SLOT} (pid ${process.pid})`;
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  });
  server.keepAliveTimeout = 65000;
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
}
