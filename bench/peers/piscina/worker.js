// The heavy work, identical to sign_records() in
// crates/corral/examples/event_loop.rs: HMAC-SHA256 over `records` payment
// records, MACs XOR-folded, hex digest.
'use strict';
const crypto = require('node:crypto');

const KEY = Buffer.from('corral-bench-key');

module.exports = function signRecords(records) {
  const fold = Buffer.alloc(32);
  for (let i = 0; i < records; i++) {
    const record = `record-${String(i).padStart(8, '0')}|amount=${(i * 7) % 100000}|currency=EUR`;
    const mac = crypto.createHmac('sha256', KEY).update(record).digest();
    for (let j = 0; j < 32; j++) fold[j] ^= mac[j];
  }
  return fold.toString('hex');
};
