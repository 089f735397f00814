//! One suite of the [`payments::Store`] invariants, run against SQLite and
//! against Postgres. Each "node" is a store opened on its own (its own
//! connections), so the races below are races between processes' views of
//! one database. The Postgres runs need `CORRAL_TEST_POSTGRES` (a
//! `postgres://` URL); without it they say so on stderr, by name.

use std::sync::Barrier;
use std::time::Duration;

use payments::domain::ids::random_token;
use payments::domain::payment::NewPayment;
use payments::settlement::{check_all, split_header};
use payments::store::{now_ms, CreateOutcome};
use payments::{Merchants, StoreHandle};

#[path = "signing/mod.rs"]
mod signing;

/// Opens a new "node" on the database under test.
type Open<'a> = &'a (dyn Fn() -> StoreHandle + Sync);

fn sqlite(test: impl FnOnce(Open<'_>)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    let open = move || {
        StoreHandle::new(
            payments::SqliteStore::open(
                &path,
                payments::Synchronous::Normal,
                Duration::from_secs(30),
            )
            .expect("open sqlite"),
        )
    };
    test(&open);
}

fn postgres(name: &str, test: impl FnOnce(Open<'_>)) {
    let Ok(url) = std::env::var("CORRAL_TEST_POSTGRES") else {
        // Straight to stderr: the test harness hides `eprintln!` of a
        // passing test, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: {name} (CORRAL_TEST_POSTGRES not set)"
        );
        return;
    };
    let open = move || StoreHandle::new(payments::PgStore::open(&url).expect("open postgres"));
    test(&open);
}

fn request(reference: &str) -> NewPayment {
    NewPayment {
        merchant_id: "acme".into(),
        amount: 1250,
        currency: "EUR".into(),
        reference: reference.into(),
    }
}

/// Two nodes, 16 threads each, one key: one payment, every other answer
/// the same bytes; another body with that key is a conflict.
fn one_payment_per_key_when_nodes_race(open: Open<'_>) {
    let key = format!("race-{}", random_token(12));
    let nodes = [open(), open()];
    let barrier = Barrier::new(32);
    let outcomes: Vec<CreateOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let (node, barrier, key) = (&nodes[i % 2], &barrier, &key);
                s.spawn(move || {
                    barrier.wait();
                    node.create_payment(key, &request("race")).expect("create")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let created: Vec<&Vec<u8>> = outcomes
        .iter()
        .filter_map(|o| match o {
            CreateOutcome::Created(_, body) => Some(body),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    for o in &outcomes {
        match o {
            CreateOutcome::Created(..) => {}
            CreateOutcome::Replayed(body) => assert_eq!(body, created[0]),
            CreateOutcome::Conflict => panic!("same body, no conflict"),
        }
    }
    assert_eq!(
        nodes[1]
            .create_payment(&key, &request("other"))
            .expect("create"),
        CreateOutcome::Conflict
    );
    let payment: serde_json::Value = serde_json::from_slice(created[0]).expect("json");
    let id = payment["id"].as_str().expect("id");
    assert_eq!(
        nodes[1].payment_json(id).expect("get").as_ref(),
        Some(created[0])
    );
}

/// A signed CSV of `ids`, in that order.
fn csv(ids: &[String]) -> String {
    let mut out = format!("{}\n", signing::HEADER);
    for id in ids {
        out.push_str(&signing::line(id, "acme", "100", "EUR"));
        out.push('\n');
    }
    out
}

/// Two nodes settle two batches of the same 300 ids at once (in opposite
/// orders, the worst case for lock order): each id is accepted by exactly
/// one batch and refused as already settled by the other.
fn each_id_settled_once_when_batches_race(open: Open<'_>) {
    let run = random_token(10);
    let ids: Vec<String> = (0..300).map(|i| format!("race-{run}-{i}")).collect();
    let mut reversed = ids.clone();
    reversed.reverse();
    let bodies = [csv(&ids), csv(&reversed)];
    let nodes = [open(), open()];
    let merchants = Merchants::demo();
    let barrier = Barrier::new(2);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (node, body, barrier, merchants, run) =
                    (&nodes[i], &bodies[i], &barrier, &merchants, &run);
                s.spawn(move || {
                    let data = split_header(body.as_bytes()).expect("header");
                    let checked = check_all(data, merchants, |_| {});
                    barrier.wait();
                    node.settle(&format!("stl_{run}_{i}"), &checked, None)
                        .expect("settle")
                        .expect("a sync batch is always settled")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    assert_eq!(
        results[0].accepted + results[1].accepted,
        300,
        "{results:?}"
    );
    assert_eq!(results[0].rejected + results[1].rejected, 300);
    for r in &results {
        assert!(r
            .errors
            .iter()
            .all(|e| e.reason == payments::settlement::Reason::AlreadySettled));
    }
    // Settling them again accepts none.
    let data = bodies[0].clone();
    let checked = check_all(
        split_header(data.as_bytes()).expect("header"),
        &merchants,
        |_| {},
    );
    let again = nodes[0]
        .settle(&format!("stl_{run}_again"), &checked, None)
        .expect("settle")
        .expect("settled");
    assert_eq!((again.accepted, again.rejected), (0, 300));
    let row = nodes[1]
        .batch(&format!("stl_{run}_again"))
        .expect("batch")
        .expect("stored");
    assert_eq!((row.status.as_str(), row.total), ("done", 300));
}

/// Node A stores a batch and dies (its lease runs out unrenewed); node B
/// claims it, A can neither renew nor commit any more, B finishes it.
fn a_dead_nodes_batch_is_finished_by_another(open: Open<'_>) {
    let run = random_token(10);
    let (a, b) = (open(), open());
    let batch_id = format!("stl_{run}_lease");
    let ids: Vec<String> = (0..20).map(|i| format!("lease-{run}-{i}")).collect();
    let body = csv(&ids);
    let owner_a = format!("a-{run}");
    let owner_b = format!("b-{run}");
    a.enqueue_batch(&batch_id, body.as_bytes(), 20, &owner_a, now_ms() + 60_000)
        .expect("enqueue");
    // A's lease is live: B claims nothing of it.
    assert!(!b
        .claim_expired(&owner_b, now_ms() + 60_000)
        .expect("claim")
        .contains(&batch_id));
    // A dies: its lease is let run out.
    assert!(a
        .renew_lease(&batch_id, &owner_a, now_ms() - 1, Some(3))
        .expect("renew"));
    let claimed = b.claim_expired(&owner_b, now_ms() + 60_000).expect("claim");
    assert!(claimed.contains(&batch_id), "{claimed:?}");
    assert!(!a
        .claim_expired(&owner_a, now_ms() + 60_000)
        .expect("claim")
        .contains(&batch_id));
    assert!(!a
        .renew_lease(&batch_id, &owner_a, now_ms() + 60_000, None)
        .expect("renew"));
    let stored = b.batch_body(&batch_id).expect("body").expect("stored");
    assert_eq!(stored, body.as_bytes());
    let merchants = Merchants::demo();
    let checked = check_all(split_header(&stored).expect("header"), &merchants, |_| {});
    assert_eq!(
        a.settle(&batch_id, &checked, Some(&owner_a))
            .expect("settle"),
        None,
        "a former owner must not commit"
    );
    let done = b
        .settle(&batch_id, &checked, Some(&owner_b))
        .expect("settle")
        .expect("the owner commits");
    assert_eq!(done.accepted, 20);
    let row = a.batch(&batch_id).expect("batch").expect("row");
    assert_eq!((row.status.as_str(), row.processed), ("done", 20));
    assert_eq!(b.batch_body(&batch_id).expect("body"), None);
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::sqlite(super::$name); })*
        }
        mod postgres {
            $(#[test] fn $name() {
                super::postgres(concat!("postgres::", stringify!($name)), super::$name);
            })*
        }
    };
}

both!(
    one_payment_per_key_when_nodes_race,
    each_id_settled_once_when_batches_race,
    a_dead_nodes_batch_is_finished_by_another,
);
