//! Our CLIP tokenizer gives the same ids as OpenAI's reference tokenizer (open_clip's copy)
//! on every caption of ../shared/data/captions (UCM, Sydney, RSICD: 68,170 captions).

mod common;

use rsitrd::model::ClipTokenizer;

use common::{fixture, shared_dir};

/// FNV-1a (32 bit) of the ids as little-endian i32, as tests/make_fixtures.py computes it.
fn fnv1a32(ids: &[i32]) -> u32 {
    let mut hash: u32 = 0x811C_9DC5;
    for id in ids {
        for byte in id.to_le_bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

fn captions(file: &str) -> Vec<String> {
    let path = shared_dir().join("data/captions").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if file.ends_with(".jsonl") {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .flat_map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                row["captions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    } else {
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|image| image["sentences"].as_array().unwrap().iter())
            .map(|s| s["raw"].as_str().unwrap().to_string())
            .collect()
    }
}

#[test]
fn ids_match_openai_reference_on_every_caption() {
    let reference = std::fs::read_to_string(fixture("tokenizer-reference.tsv")).unwrap();
    let tokenizer = ClipTokenizer::new(77);
    let mut current: Option<(String, Vec<String>, usize)> = None;
    let mut checked = 0usize;
    let mut mismatches = Vec::new();
    let mut files = 0;
    for line in reference.lines() {
        if let Some(file) = line.strip_prefix("# ") {
            if let Some((name, list, seen)) = current.take() {
                assert_eq!(
                    seen,
                    list.len(),
                    "{name}: caption count differs from the reference"
                );
            }
            files += 1;
            current = Some((file.to_string(), captions(file), 0));
            continue;
        }
        let (name, list, seen) = current.as_mut().expect("file header first");
        let expected = u32::from_str_radix(line, 16).expect("hex hash");
        let caption = &list[*seen];
        let ids = tokenizer.encode(caption);
        if fnv1a32(&ids) != expected {
            mismatches.push(format!("{name}#{seen}: {caption:?} -> {ids:?}"));
        }
        *seen += 1;
        checked += 1;
    }
    if let Some((name, list, seen)) = current {
        assert_eq!(
            seen,
            list.len(),
            "{name}: caption count differs from the reference"
        );
    }
    assert_eq!(files, 5);
    assert!(checked > 68_000, "only {checked} captions checked");
    assert!(
        mismatches.is_empty(),
        "{} of {checked} captions tokenize differently, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
}
