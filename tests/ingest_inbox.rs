//! The watched inbox: files present before start, renamed in, written in place, pairs in
//! either order, subtrees copied or moved in, a burst beyond the inotify queue, and every kind
//! of bad file rejected with `NAME.error.txt`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::ingest::{TestEnv, synthetic_png, unique, wait_for};

fn inbox_env(root: &Path) -> TestEnv {
    let mut env = TestEnv::new(root, &unique("inbox"));
    env.inbox_enabled = true;
    env.extra = vec![
        ("RSITRD__INBOX__SETTLE".into(), "300ms".into()),
        ("RSITRD__INBOX__ORPHAN_TIMEOUT".into(), "3s".into()),
        ("RSITRD__INBOX__RESCAN_INTERVAL".into(), "1s".into()),
        ("RSITRD__INGEST__MAX_IMAGE_BYTES".into(), "300000".into()),
    ];
    env
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn inbox_takes_complete_pairs_and_rejects_bad_files_with_reasons() {
    let temp = tempfile::tempdir().unwrap();
    let env = inbox_env(temp.path());
    let inbox = env.inbox.clone();
    let staging = temp.path().join("staging");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    let mini = common::rs_mini();
    let small: Vec<_> = mini
        .iter()
        .filter(|s| !s.filename.starts_with("sydney"))
        .collect();
    let sydney = mini
        .iter()
        .find(|s| s.filename.starts_with("sydney"))
        .unwrap();

    // Present before the start (arrived while the daemon was down).
    copy(&small[0].path, &inbox.join("before.jpg"));
    std::fs::write(
        inbox.join("before.txt"),
        "a playground\nbuildings around it\n",
    )
    .unwrap();
    copy(&small[15].path, &inbox.join("meta.tif"));
    std::fs::write(
        inbox.join("meta.json"),
        r#"{"captions": ["farmland"], "metadata": {"gsd": 0.3}}"#,
    )
    .unwrap();
    // Bad files.
    copy(&small[1].path, &inbox.join("orphan.jpg"));
    std::fs::write(inbox.join("notes.gif"), b"GIF89a").unwrap();
    std::os::unix::fs::symlink(&small[2].path, inbox.join("link.jpg")).unwrap();
    std::fs::write(inbox.join("link.txt"), "a link").unwrap();
    copy(&small[3].path, &inbox.join("amb.jpg"));
    std::fs::write(inbox.join("amb.png"), synthetic_png(1, 8)).unwrap();
    std::fs::write(inbox.join("amb.txt"), "ambiguous").unwrap();
    let jpeg = std::fs::read(&small[4].path).unwrap();
    std::fs::write(inbox.join("cut.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(inbox.join("cut.txt"), "truncated").unwrap();
    std::fs::write(inbox.join("zero.png"), b"").unwrap();
    std::fs::write(inbox.join("zero.txt"), "nothing").unwrap();
    copy(&small[5].path, &inbox.join("enc.jpg"));
    std::fs::write(inbox.join("enc.txt"), b"caf\xe9 au lait\n").unwrap();
    copy(&small[6].path, &inbox.join("blank.jpg"));
    std::fs::write(inbox.join("blank.txt"), "\n   \n").unwrap();
    copy(&sydney.path, &inbox.join("big.tif"));
    std::fs::write(inbox.join("big.txt"), "too many bytes").unwrap();
    std::fs::write(inbox.join("badjson.png"), synthetic_png(2, 8)).unwrap();
    std::fs::write(inbox.join("badjson.json"), r#"{"captions": "one"}"#).unwrap();
    let bad = [
        (
            "orphan",
            "orphan",
            "no caption file orphan.txt or orphan.json arrived",
        ),
        ("notes", "file", "unsupported file type `.gif`"),
        ("link", "file", "symbolic links are not accepted"),
        ("link", "orphan", "no image link"),
        ("amb", "file", "ambiguous pair"),
        ("cut", "image", "truncated"),
        ("zero", "image", "empty"),
        ("enc", "captions", "not valid UTF-8"),
        ("blank", "captions", "no captions"),
        ("big", "too_large", "more than ingest.max_image_bytes"),
        ("badjson", "captions", "invalid caption JSON"),
    ];

    let mut ingest = env.start(&temp.path().join("ingest.log"));
    // Renamed in: image first, caption later.
    copy(&small[7].path, &staging.join("r1.jpg"));
    std::fs::write(staging.join("r1.txt"), "a bridge over a river").unwrap();
    std::fs::rename(staging.join("r1.jpg"), inbox.join("r1.jpg")).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::fs::rename(staging.join("r1.txt"), inbox.join("r1.txt")).unwrap();
    // Caption first, then the image.
    std::fs::write(staging.join("r2.txt"), "dense city blocks").unwrap();
    copy(&small[8].path, &staging.join("r2.png.jpg"));
    std::fs::rename(staging.join("r2.txt"), inbox.join("r2.txt")).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::fs::rename(staging.join("r2.png.jpg"), inbox.join("r2.jpg")).unwrap();
    // Written in place, slowly: a pause longer than `settle` mid-write must not make the
    // half-written file look complete.
    let tiff = std::fs::read(&small[16].path).unwrap();
    {
        let mut file = std::fs::File::create(inbox.join("slow.tif")).unwrap();
        file.write_all(&tiff[..tiff.len() / 2]).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        file.write_all(&tiff[tiff.len() / 2..]).unwrap();
    }
    std::fs::write(inbox.join("slow.txt"), "crop rows").unwrap();
    // A subtree moved in (one event for the directory, none for its files) and one copied in.
    for (tree, offset) in [("moved", 9), ("copied", 12)] {
        let root = staging.join(tree);
        for i in 0..3 {
            let dir = root.join(format!("region{i}/tiles"));
            std::fs::create_dir_all(&dir).unwrap();
            copy(
                &small[offset + i].path,
                &dir.join(format!("t{i}.{}", extension(&small[offset + i].path))),
            );
            std::fs::write(dir.join(format!("t{i}.txt")), format!("{tree} tile {i}")).unwrap();
        }
    }
    std::fs::rename(staging.join("moved"), inbox.join("moved")).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(staging.join("copied"))
        .arg(inbox.join("copied"))
        .status()
        .unwrap();
    assert!(status.success());

    let expected_samples = 2 + 2 + 1 + 6;
    wait_for(Duration::from_secs(60), "every inbox file handled", || {
        let stats = env.stats();
        stats["samples"] == expected_samples && stats["rejected"] == bad.len()
    });
    assert!(ingest.alive());
    let stats = env.stats();
    assert_eq!(stats["by_source"]["inbox"], expected_samples, "{stats}");
    assert_eq!(stats["rejected_by_kind"]["orphan"], 2, "{stats}");
    ingest.stop();

    // Stored pairs moved to done/ with their relative paths; rejects to rejected/ with reasons.
    let done = inbox.join("done");
    for name in [
        "before.jpg",
        "before.txt",
        "meta.tif",
        "meta.json",
        "r1.jpg",
        "r1.txt",
        "r2.jpg",
        "r2.txt",
        "slow.tif",
        "slow.txt",
        "moved/region1/tiles/t1.txt",
        "copied/region2/tiles/t2.txt",
    ] {
        assert!(
            done.join(name).exists(),
            "done/{name} missing: {:?}",
            files_under(&done)
        );
    }
    let rejected = inbox.join("rejected");
    for (stem, _, words) in bad {
        let reasons: Vec<String> = files_under(&rejected)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                name.starts_with(&format!("{stem}.")) && name.ends_with(".error.txt")
            })
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains(words)),
            "{stem}: no error.txt saying `{words}`: {reasons:?}"
        );
    }
    assert!(rejected.join("cut.jpg").exists() && rejected.join("cut.txt").exists());
    assert!(
        std::fs::symlink_metadata(rejected.join("link.jpg"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Nothing left behind in the inbox itself.
    let left: Vec<PathBuf> = files_under(&inbox)
        .into_iter()
        .filter(|p| !p.starts_with(&done) && !p.starts_with(&rejected))
        .collect();
    assert!(left.is_empty(), "left in the inbox: {left:?}");
    // The slowly written TIFF was stored whole.
    let store = rsitrd::store::Store::open(
        &env.data.join("store"),
        rsitrd::store::SplitPolicy {
            val_fraction: 0.1,
            seed: 42,
        },
    )
    .unwrap();
    let id = rsitrd::store::SampleId::of_image(&tiff);
    let record = store.get(&id).unwrap().expect("the slow TIFF, complete");
    assert_eq!(record.captions, vec!["crop rows"]);
    assert_eq!(store.read_image(&id).unwrap(), tiff);
    let meta = store
        .get(&rsitrd::store::SampleId::of_image(
            &std::fs::read(&small[15].path).unwrap(),
        ))
        .unwrap()
        .unwrap();
    assert_eq!(meta.metadata["gsd"], 0.3);
}

fn extension(path: &Path) -> String {
    path.extension().unwrap().to_string_lossy().into_owned()
}

#[test]
fn a_burst_beyond_the_inotify_queue_is_ingested_completely() {
    let temp = tempfile::tempdir().unwrap();
    let mut env = inbox_env(temp.path());
    env.extra
        .push(("RSITRD__INBOX__ON_SUCCESS".into(), "delete".into()));
    std::fs::create_dir_all(&env.inbox).unwrap();
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    std::thread::sleep(Duration::from_millis(300));
    // 3,000 pairs written in place: create + modify + close per file, ~18,000 events, more
    // than the 16,384 the kernel queues by default.
    let count = 3000u32;
    for i in 0..count {
        let dir = env.inbox.join(format!("batch{}", i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("p{i}.png")), synthetic_png(10_000 + i, 8)).unwrap();
        std::fs::write(dir.join(format!("p{i}.txt")), format!("tile number {i}\n")).unwrap();
    }
    wait_for(Duration::from_secs(120), "the whole burst stored", || {
        env.stats()["samples"] == count
    });
    ingest.stop();
    let overflows = ingest.log_text().matches("overflowed").count();
    println!("event queue overflows during the burst: {overflows}");
    let stats = env.stats();
    assert_eq!(stats["captions"], count, "{stats}");
    assert_eq!(stats["rejected"], 0, "{stats}");
    let left = files_under(&env.inbox);
    assert!(
        left.is_empty(),
        "on_success = delete leaves nothing: {} files",
        left.len()
    );
}
