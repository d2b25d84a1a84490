//! The durable store on a real directory: idempotent commits, caption merges, counters,
//! cursors, replay sampling, persistence, and a read-only reader beside the writer.

mod common;

use rsitrd::store::{
    CommitOutcome, NewSample, OpOutcome, SampleId, SampleSplit, SplitPolicy, Store, StoreOp,
    StoreReader,
};

const POLICY: SplitPolicy = SplitPolicy {
    val_fraction: 0.25,
    seed: 3,
};

fn sample(seed: u32, captions: &[&str], source: &str) -> NewSample {
    NewSample::new(
        common::ingest::synthetic_png(seed, 8),
        captions.iter().map(|c| c.to_string()).collect(),
        serde_json::Map::new(),
        source.into(),
        format!("s{seed}"),
        "png".into(),
        8,
        8,
    )
}

fn commit(store: &Store, samples: Vec<NewSample>) -> Vec<CommitOutcome> {
    let ops: Vec<StoreOp> = samples.into_iter().map(StoreOp::Sample).collect();
    store
        .commit_batch(&ops)
        .unwrap()
        .into_iter()
        .map(|o| match o {
            OpOutcome::Sample(o) => o,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn commits_are_idempotent_merge_captions_and_count() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(temp.path(), POLICY).unwrap();
    let outcomes = commit(
        &store,
        vec![
            sample(1, &["a", "b"], "amqp"),
            sample(2, &["c"], "inbox"),
            // The same image twice in one batch: the second is a duplicate.
            sample(1, &["a", "b"], "amqp"),
        ],
    );
    assert!(matches!(outcomes[0], CommitOutcome::New { .. }));
    assert!(matches!(outcomes[1], CommitOutcome::New { .. }));
    assert!(matches!(outcomes[2], CommitOutcome::Duplicate { .. }));
    let merged = commit(&store, vec![sample(1, &["b", "d", "d"], "inbox")]);
    assert_eq!(
        merged[0],
        CommitOutcome::Merged {
            id: outcomes[0].id(),
            added: 1
        }
    );

    let stats = store.stats().unwrap();
    assert_eq!(stats.samples, 2);
    assert_eq!(stats.captions, 4);
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.merges, 1);
    assert_eq!(stats.train + stats.val, 2);
    assert_eq!(
        stats.by_source["amqp"], 1,
        "the first delivery's source counts"
    );
    assert_eq!(stats.by_source["inbox"], 1);

    let record = store.get(&outcomes[0].id()).unwrap().unwrap();
    assert_eq!(record.captions, vec!["a", "b", "d"]);
    assert_eq!(record.split, POLICY.split_of(&record.id));
    assert_eq!(
        store.read_image(&record.id).unwrap(),
        common::ingest::synthetic_png(1, 8)
    );
    assert_eq!(
        record.id,
        SampleId::of_image(&common::ingest::synthetic_png(1, 8))
    );

    // Rejects count once per input key.
    let reject = rsitrd::store::RejectRecord {
        key: SampleId::of_image(b"bad"),
        source: "amqp".into(),
        source_ref: "m1".into(),
        kind: "message".into(),
        reason: "broken".into(),
        at_ms: 0,
    };
    let first = store
        .commit_batch(&[StoreOp::Reject(reject.clone())])
        .unwrap();
    let again = store.commit_batch(&[StoreOp::Reject(reject)]).unwrap();
    assert_eq!(first, vec![OpOutcome::Reject { first_time: true }]);
    assert_eq!(again, vec![OpOutcome::Reject { first_time: false }]);
    let stats = store.stats().unwrap();
    assert_eq!(stats.rejected, 1);
    assert_eq!(stats.rejected_by_kind["message"], 1);
    assert_eq!(store.rejects().unwrap().len(), 1);
}

#[test]
fn cursor_replay_and_reopen() {
    let temp = tempfile::tempdir().unwrap();
    let ids: Vec<SampleId>;
    {
        let store = Store::open(temp.path(), POLICY).unwrap();
        let outcomes = commit(
            &store,
            (0..40).map(|i| sample(100 + i, &["x"], "import")).collect(),
        );
        ids = outcomes.iter().map(CommitOutcome::id).collect();
        // Cursor pages in arrival order.
        let first = store.page_since(0, 15).unwrap().records;
        let rest = store
            .page_since(first.last().unwrap().seq, 100)
            .unwrap()
            .records;
        let seen: Vec<SampleId> = first.iter().chain(&rest).map(|r| r.id).collect();
        assert_eq!(seen, ids);
        let cursor = rest.last().unwrap().seq;
        assert!(store.page_since(cursor, 10).unwrap().records.is_empty());
        // A merge moves the sample past the cursor, once.
        commit(&store, vec![sample(105, &["new caption"], "import")]);
        let changed = store.page_since(cursor, 10).unwrap().records;
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].id, ids[5]);
        assert_eq!(
            store.page_since(0, 100).unwrap().records.len(),
            40,
            "each sample listed once"
        );

        // The split index: ordinals follow creation, per split, and agree with the records.
        let train: Vec<_> = store
            .samples_in(Some(SampleSplit::Train))
            .unwrap()
            .into_iter()
            .collect();
        let train_len = store.split_len(SampleSplit::Train).unwrap();
        assert_eq!(train_len as usize, train.len());
        let by_ordinal = store.split_range(SampleSplit::Train, 0, train_len).unwrap();
        assert_eq!(by_ordinal.len(), train.len());
        assert!(
            by_ordinal
                .windows(2)
                .all(|w| w[0].created_seq < w[1].created_seq),
            "creation order"
        );
        // Replay: seeded, only train samples among the first `upto` (point lookups).
        let upto = 20;
        let bound = by_ordinal[upto as usize - 1].created_seq;
        let replay = store.sample_split(SampleSplit::Train, upto, 8, 11).unwrap();
        assert_eq!(
            replay,
            store.sample_split(SampleSplit::Train, upto, 8, 11).unwrap()
        );
        assert_ne!(
            replay.iter().map(|r| r.id).collect::<Vec<_>>(),
            store
                .sample_split(SampleSplit::Train, upto, 8, 12)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        );
        assert_eq!(replay.len(), 8);
        assert!(
            replay
                .iter()
                .all(|r| r.split == SampleSplit::Train && r.created_seq <= bound)
        );
        assert_eq!(
            store
                .sample_split(SampleSplit::Train, upto, 1000, 1)
                .unwrap()
                .len(),
            upto as usize
        );
        assert_eq!(store.train_ordinal_after(bound).unwrap(), upto);
        assert_eq!(store.train_ordinal_after(0).unwrap(), 0);

        // A reader in another handle (as `rsitrd stats` beside the daemon) sees the commits.
        let reader = StoreReader::open(temp.path()).unwrap();
        assert_eq!(reader.stats().unwrap().samples, 40);
    }
    // Leftover temp file of a write that never finished is cleaned up on open.
    std::fs::write(temp.path().join("tmp/deadbeef.123"), b"partial").unwrap();
    let store = Store::open(temp.path(), POLICY).unwrap();
    assert!(
        std::fs::read_dir(temp.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    let stats = store.stats().unwrap();
    assert_eq!(stats.samples, 40);
    assert_eq!(
        stats.val,
        store.samples_in(Some(SampleSplit::Val)).unwrap().len() as u64
    );
    assert!(stats.val > 0 && stats.train > stats.val, "{stats:?}");
    for id in &ids {
        assert!(store.get(id).unwrap().is_some());
    }
}

#[test]
fn quarantined_samples_are_skipped_by_every_read_and_never_pin_a_cursor() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(temp.path(), POLICY).unwrap();
    let ids: Vec<SampleId> = commit(
        &store,
        (0..3000).map(|i| sample(i, &["x"], "inbox")).collect(),
    )
    .iter()
    .map(CommitOutcome::id)
    .collect();
    // Quarantine every sample but the last: a page of 10 must still move past all of them
    // in bounded scans (at most 1024 entries per page) instead of stalling.
    for id in &ids[..2999] {
        store.quarantine(id, "embed", "unusable").unwrap();
    }
    assert!(
        !store.quarantine(&ids[0], "train", "again").unwrap(),
        "once"
    );
    assert_eq!(store.stats().unwrap().quarantined, 2999);
    let (mut cursor, mut pages, mut seen) = (0, 0, Vec::new());
    loop {
        let page = store.page_since(cursor, 10).unwrap();
        if page.next_cursor == cursor {
            break;
        }
        assert!(page.next_cursor - cursor <= 1024);
        cursor = page.next_cursor;
        seen.extend(page.records.into_iter().map(|r| r.id));
        pages += 1;
    }
    assert_eq!(seen, vec![ids[2999]]);
    assert!((3..=4).contains(&pages), "{pages} pages");
    assert_eq!(store.samples_in(None).unwrap().len(), 1);
    let train = store.split_len(SampleSplit::Train).unwrap();
    assert!(
        store
            .sample_split(SampleSplit::Train, train, 100, 1)
            .unwrap()
            .len()
            <= 1
    );
    assert!(
        store
            .split_range(SampleSplit::Train, 0, train)
            .unwrap()
            .len()
            <= 1
    );
    let records = store.quarantined().unwrap();
    assert_eq!(records.len(), 2999);
    assert_eq!(
        records.iter().find(|r| r.id == ids[0]).unwrap().stage,
        "embed"
    );

    // Release gives each sample a new change number: a cursor at the end sees it again.
    let released = store.release(Some(&[ids[5], SampleId([9; 32])])).unwrap();
    assert_eq!(released, vec![ids[5]]);
    let page = store.page_since(cursor, 10).unwrap();
    assert_eq!(
        page.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[5]]
    );
    assert_eq!(store.release(None).unwrap().len(), 2998);
    assert_eq!(store.stats().unwrap().quarantined, 0);
    assert_eq!(store.samples_in(None).unwrap().len(), 3000);
    let reader = StoreReader::open(temp.path()).unwrap();
    assert!(reader.quarantined().unwrap().is_empty());
}

fn reject(name: &str, source: &str, at_ms: u64) -> StoreOp {
    StoreOp::Reject(rsitrd::store::RejectRecord {
        key: SampleId::of_image(name.as_bytes()),
        source: source.into(),
        source_ref: name.into(),
        kind: "image".into(),
        reason: format!("{name} is broken"),
        at_ms,
    })
}

#[test]
fn latest_rejects_and_samples_are_bounded_reads_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), POLICY).unwrap();
    store
        .commit_batch(&[reject("a", "inbox", 30), reject("b", "amqp", 10)])
        .unwrap();
    // A re-delivered reject counts once and keeps its place.
    store
        .commit_batch(&[reject("c", "inbox", 20), reject("a", "inbox", 99)])
        .unwrap();
    let latest: Vec<String> = store
        .recent_rejects(10)
        .unwrap()
        .into_iter()
        .map(|r| r.source_ref)
        .collect();
    assert_eq!(latest, ["a", "c", "b"], "by time, newest first");
    assert_eq!(store.recent_rejects(2).unwrap().len(), 2);
    let stats = store.stats().unwrap();
    assert_eq!(stats.rejected, 3);
    assert_eq!(
        stats.rejected_by_source,
        [("amqp".to_string(), 1), ("inbox".to_string(), 2)].into()
    );

    commit(&store, (0..5).map(|i| sample(i, &["x"], "inbox")).collect());
    commit(&store, vec![sample(1, &["y"], "amqp")]);
    let recent: Vec<String> = store
        .recent_samples(3)
        .unwrap()
        .into_iter()
        .map(|r| r.source_ref)
        .collect();
    // Sample 1 changed last (a caption merge), then 4 and 3 were created last.
    assert_eq!(recent, ["s1", "s4", "s3"]);
    drop(store);
    // Reopening keeps the time index as it is (nothing rebuilt, nothing doubled).
    let store = Store::open(dir.path(), POLICY).unwrap();
    assert_eq!(store.recent_rejects(10).unwrap().len(), 3);
    assert_eq!(store.stats().unwrap().rejected_by_source["inbox"], 2);
}
