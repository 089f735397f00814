//! The Postgres store: every node of a deployment on one database.
//!
//! The invariants hold across nodes by the database's own means:
//! - payments: a transaction-scoped advisory lock on the key's hash makes
//!   racing requests with one key take turns, so the second sees the
//!   first's committed row and replays it (the primary key is the
//!   backstop);
//! - settlements: `INSERT .. ON CONFLICT DO NOTHING RETURNING` claims ids;
//!   a racing batch's insert of the same id waits for the first to commit
//!   and then claims nothing, so each id is settled once. Batches that
//!   claim overlapping ids in different orders may deadlock; Postgres
//!   aborts one and it is retried;
//! - async batches: the lease is checked under `FOR UPDATE` in the final
//!   transaction, and expired leases are claimed with `SKIP LOCKED`, so one
//!   node at a time runs a batch and a dead node's batch is finished by
//!   another.
//!
//! The `postgres` crate is tokio-postgres behind a blocking API, which fits
//! the [`Store`] calls made from pool threads and `spawn_blocking`.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};

use super::{now_ms, redact, BatchRow, CreateOutcome, Store, StoreError};
use crate::domain::ids::now_rfc3339;
use crate::domain::payment::{NewPayment, Payment};
use crate::domain::settlement::{merge, BatchResult, Checked};

/// The migrations, in order; each runs once per database.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../migrations/postgres/0001_init.sql"))];

/// Connections a process opens at most; callers beyond them wait for one
/// to be handed back. Opening one per caller instead costs a handshake and a
/// new Postgres backend process each time: under 64 concurrent requests a
/// node spent more time connecting than storing (402 connections opened in
/// 4 s, 463 payments/s; bench/RESULTS.md).
const MAX_CONNECTIONS: usize = 8;

/// Ids claimed per statement when settling.
const CLAIM_CHUNK: usize = 5_000;

/// Tries of a transaction Postgres aborted as a deadlock or serialization
/// failure.
const RETRIES: usize = 8;

/// A handle on a Postgres database over at most [`MAX_CONNECTIONS`]
/// connections, kept open between calls.
pub struct PgStore {
    url: String,
    pool: Mutex<Pool>,
    /// Signalled when a connection is handed back or given up.
    returned: Condvar,
}

/// The connections of a [`PgStore`]. Written here because the blocking
/// pool crate for `postgres` (r2d2_postgres) is not among the workspace's
/// dependencies, and a counter and a condition variable are all it takes:
/// the calls come from pool threads and `spawn_blocking`, which may wait.
#[derive(Default)]
struct Pool {
    idle: Vec<Client>,
    /// Connections open, idle or lent out.
    open: usize,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &redact(&self.url))
            .finish()
    }
}

impl PgStore {
    /// Connect to `url` and bring its schema up to date.
    ///
    /// ```no_run
    /// use payments::Store;
    /// let store = payments::PgStore::open("postgres://corral:corral@127.0.0.1:5432/corral_test")?;
    /// println!("{} payments", store.payment_count()?);
    /// # Ok::<(), payments::StoreError>(())
    /// ```
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let store = PgStore {
            url: url.to_owned(),
            pool: Mutex::new(Pool::default()),
            returned: Condvar::new(),
        };
        let failed = |e: postgres::Error| StoreError::Connect {
            url: redact(url),
            cause: e.to_string().trim_end_matches('.').to_owned(),
        };
        let client = off_runtime(|| {
            let mut client = Client::connect(url, NoTls)?;
            migrate(&mut client)?;
            Ok::<_, postgres::Error>(client)
        })
        .map_err(failed)?;
        store.lock().open = 1;
        store.put_back(client);
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // A panic while holding the lock leaves the pool consistent (it is
        // only pushed to, popped from and counted).
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, a new one below the cap, or the next one handed
    /// back.
    fn take(&self) -> Result<Client, StoreError> {
        let mut pool = self.lock();
        loop {
            if let Some(client) = pool.idle.pop() {
                return Ok(client);
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                return Client::connect(&self.url, NoTls).map_err(|e| {
                    self.give_up();
                    e.into()
                });
            }
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One connection fewer (failed to open, or found closed).
    fn give_up(&self) {
        self.lock().open -= 1;
        self.returned.notify_one();
    }

    fn put_back(&self, client: Client) {
        if client.is_closed() {
            drop(client);
            self.give_up();
            return;
        }
        self.lock().idle.push(client);
        self.returned.notify_one();
    }

    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut lent = Lent {
            store: self,
            client: Some(self.take()?),
        };
        f(lent.client.as_mut().expect("lent until dropped"))
    }

    /// Run `f` in a transaction, again when Postgres aborts it as a
    /// deadlock or serialization failure (its work is then undone).
    fn transaction<T>(
        &self,
        mut f: impl FnMut(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_client(|client| {
            let mut tries = 0;
            loop {
                let mut tx = client.transaction()?;
                let outcome = f(&mut tx).and_then(|v| {
                    tx.commit()?;
                    Ok(v)
                });
                match outcome {
                    Err(StoreError::Postgres(e)) if retryable(&e) && tries < RETRIES => {
                        tries += 1;
                    }
                    other => return other,
                }
            }
        })
    }
}

/// A connection lent to one call: handed back when the call ends, given up
/// if it panicked (the connection may be mid-transaction), so the pool never
/// loses count.
struct Lent<'a> {
    store: &'a PgStore,
    client: Option<Client>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if std::thread::panicking() {
            drop(client);
            self.store.give_up();
        } else {
            self.store.put_back(client);
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Each client owns a small runtime, which may not be dropped on a
        // thread that drives async tasks (a worker shutting down).
        let pool = self.pool.get_mut().unwrap_or_else(|e| e.into_inner());
        let idle = std::mem::take(&mut pool.idle);
        off_runtime(move || drop(idle));
    }
}

/// Run `f` on a thread of its own when called from async code: a
/// `postgres::Client` blocks on a runtime of its own, which tokio forbids
/// inside another runtime (e.g. a worker opening its store).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// Apply the migrations not applied yet, one node at a time.
fn migrate(client: &mut Client) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    // Any constant: the lock only makes starting nodes take turns.
    tx.execute("SELECT pg_advisory_xact_lock(7340611)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )?
            .is_some();
        if !done {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &now_rfc3339()],
            )?;
        }
    }
    tx.commit()
}

impl Store for PgStore {
    fn create_payment(&self, key: &str, req: &NewPayment) -> Result<CreateOutcome, StoreError> {
        let fingerprint = req.fingerprint();
        self.transaction(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key])?;
            if let Some(row) = tx.query_opt(
                "SELECT fingerprint, response FROM idempotency_keys WHERE key = $1",
                &[&key],
            )? {
                let stored: String = row.get(0);
                return Ok(if stored == fingerprint {
                    CreateOutcome::Replayed(row.get(1))
                } else {
                    CreateOutcome::Conflict
                });
            }
            let payment = Payment::capture(req);
            let body = payment.to_json_bytes();
            tx.execute(
                "INSERT INTO payments (id, merchant_id, amount, currency, reference, status, created_at, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &payment.id,
                    &payment.merchant_id,
                    &payment.amount,
                    &payment.currency,
                    &payment.reference,
                    &payment.status,
                    &payment.created_at,
                    &body,
                ],
            )?;
            tx.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, response, created_at) VALUES ($1, $2, $3, $4)",
                &[&key, &fingerprint, &body, &payment.created_at],
            )?;
            Ok(CreateOutcome::Created(payment, body))
        })
    }

    fn payment_json(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_client(|c| {
            Ok(
                c.query_opt("SELECT body FROM payments WHERE id = $1", &[&id])?
                    .map(|r| r.get(0)),
            )
        })
    }

    fn payment_count(&self) -> Result<u64, StoreError> {
        self.with_client(|c| {
            Ok(c.query_one("SELECT count(*) FROM payments", &[])?
                .get::<_, i64>(0) as u64)
        })
    }

    fn settle(
        &self,
        batch_id: &str,
        lines: &Checked<'_>,
        owner: Option<&str>,
    ) -> Result<Option<BatchResult>, StoreError> {
        // The first valid line of each id is the one that may claim it.
        let mut distinct: HashSet<&str> = HashSet::new();
        let candidates: Vec<&str> = lines
            .valid
            .iter()
            .map(|(_, r)| r.id)
            .filter(|id| distinct.insert(*id))
            .collect();
        self.transaction(|tx| {
            if let Some(owner) = owner {
                let ours = tx.query_opt(
                    "SELECT 1 FROM batches WHERE id = $1 AND status = 'processing' AND lease_owner = $2 FOR UPDATE",
                    &[&batch_id, &owner],
                )?;
                if ours.is_none() {
                    return Ok(None);
                }
            }
            // Borrowed from the batch body, not copied: a batch of 64 MiB
            // may claim close to a million ids.
            let mut claimed: HashSet<&str> = HashSet::new();
            for ids in candidates.chunks(CLAIM_CHUNK) {
                let rows = tx.query(
                    "INSERT INTO settled (id, batch_id) SELECT unnest($1::text[]), $2
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    &[&ids, &batch_id],
                )?;
                for row in rows {
                    if let Some(id) = distinct.get(row.get::<_, &str>(0)) {
                        claimed.insert(id);
                    }
                }
            }
            // merge asks once per id not yet accepted here: claimed ids
            // are accepted on their first line, the others refused on
            // every line.
            let result = merge::<StoreError>(batch_id, lines, |rec| Ok(claimed.contains(rec.id)))?;
            let json = serde_json::to_string(&result)?;
            if owner.is_some() {
                tx.execute(
                    "UPDATE batches SET status = 'done', processed = total, result = $2, lease_owner = NULL WHERE id = $1",
                    &[&batch_id, &json],
                )?;
                tx.execute("DELETE FROM batch_bodies WHERE id = $1", &[&batch_id])?;
            } else {
                tx.execute(
                    "INSERT INTO batches (id, status, total, processed, result, created_at)
                     VALUES ($1, 'done', $2, $2, $3, $4)",
                    &[&batch_id, &(result.total as i64), &json, &now_rfc3339()],
                )?;
            }
            Ok(Some(result))
        })
    }

    fn enqueue_batch(
        &self,
        batch_id: &str,
        body: &[u8],
        total: u64,
        owner: &str,
        lease_until_ms: i64,
    ) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.execute(
                "INSERT INTO batches (id, status, total, processed, lease_owner, lease_until, created_at)
                 VALUES ($1, 'processing', $2, 0, $3, $4, $5)",
                &[&batch_id, &(total as i64), &owner, &lease_until_ms, &now_rfc3339()],
            )?;
            tx.execute(
                "INSERT INTO batch_bodies (id, body) VALUES ($1, $2)",
                &[&batch_id, &body],
            )?;
            Ok(())
        })
    }

    fn claim_expired(&self, owner: &str, lease_until_ms: i64) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        self.with_client(|c| {
            Ok(c.query(
                "UPDATE batches SET lease_owner = $1, lease_until = $2
                 WHERE id IN (SELECT id FROM batches WHERE status = 'processing' AND lease_until < $3
                              FOR UPDATE SKIP LOCKED)
                 RETURNING id",
                &[&owner, &lease_until_ms, &now],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn renew_lease(
        &self,
        batch_id: &str,
        owner: &str,
        lease_until_ms: i64,
        processed: Option<u64>,
    ) -> Result<bool, StoreError> {
        let processed = processed.map(|p| p as i64);
        self.with_client(|c| {
            let n = c.execute(
                "UPDATE batches SET lease_until = $3, processed = coalesce($4, processed)
                 WHERE id = $1 AND lease_owner = $2 AND status = 'processing'",
                &[&batch_id, &owner, &lease_until_ms, &processed],
            )?;
            Ok(n == 1)
        })
    }

    fn batch_body(&self, batch_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_client(|c| {
            Ok(c.query_opt(
                "SELECT b.body FROM batch_bodies b JOIN batches j ON j.id = b.id
                 WHERE b.id = $1 AND j.status = 'processing'",
                &[&batch_id],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn batch(&self, batch_id: &str) -> Result<Option<BatchRow>, StoreError> {
        self.with_client(|c| {
            Ok(c.query_opt(
                "SELECT status, total, processed, result FROM batches WHERE id = $1",
                &[&batch_id],
            )?
            .map(|r| BatchRow {
                status: r.get(0),
                total: r.get::<_, i64>(1) as u64,
                processed: r.get::<_, i64>(2) as u64,
                result: r.get(3),
            }))
        })
    }

    fn settled_count(&self) -> Result<u64, StoreError> {
        self.with_client(|c| {
            Ok(c.query_one("SELECT count(*) FROM settled", &[])?
                .get::<_, i64>(0) as u64)
        })
    }
}
