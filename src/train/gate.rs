//! The promotion gate: a candidate serves only if, on a fixed, bounded, versioned slice of
//! validation samples, its mR comes within `gate.mr_tolerance` of both the live version and
//! the best version promoted so far (so promotions cannot drift down by a tolerance each).
//!
//! The slice mixes old and new validation samples: the newest, and a seeded uniform draw of
//! the older ones (`gate.old_fraction` of the slice, half by default). It is rebuilt (a new
//! number and identity) when the validation set has grown by a quarter of the slice; until then every evaluation of an adapter on it is
//! cached in the ledger, so a run evaluates the candidate only (the live and best versions
//! once per slice). Every read is bounded by the slice size, never by the corpus.

use std::collections::BTreeMap;

use crate::config::GateSection;
use crate::model::clip::mix_seed;
use crate::store::ledger::GateSlice;
use crate::store::{SampleSplit, Store, StoreError};

/// The slice to evaluate on: `current` while it is still representative, else a rebuilt one
/// (`true` when rebuilt). `None` while there are no validation samples.
pub fn slice_for_run(
    store: &Store,
    current: Option<&GateSlice>,
    config: &GateSection,
    seed: u64,
) -> Result<Option<(GateSlice, bool)>, StoreError> {
    let size = config.slice_size;
    let val = store.split_len(SampleSplit::Val)?;
    if val == 0 {
        return Ok(current.map(|s| (s.clone(), false)));
    }
    let size = size.max(2);
    if let Some(slice) = current {
        let grown = val.saturating_sub(slice.val_upto);
        let stale = grown > 0 && (slice.samples.len() < size || grown >= (size as u64 / 4).max(1));
        if !stale {
            return Ok(Some((slice.clone(), false)));
        }
    }
    let number = current.map_or(1, |s| s.number + 1);
    let ids = if val <= size as u64 {
        store.split_ids(SampleSplit::Val, 0..val)?
    } else {
        let older_share = (size as f64 * config.old_fraction).round() as usize;
        let newest = (size - older_share) as u64;
        let older = val - newest;
        let mut ids = store.split_ids(SampleSplit::Val, older..val)?;
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(mix_seed(seed, number));
        let drawn = rand::seq::index::sample(&mut rng, older as usize, size - newest as usize);
        ids.extend(store.split_ids(SampleSplit::Val, drawn.into_iter().map(|i| i as u64))?);
        ids
    };
    Ok(Some((GateSlice::new(number, val, ids), true)))
}

/// mR of named metrics (NaN when absent).
pub fn mr(metrics: &BTreeMap<String, f64>) -> f64 {
    metrics.get("mr").copied().unwrap_or(f64::NAN)
}

/// What the gate decided, in words for the run log.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub promote: bool,
    pub decision: String,
}

/// One side of a comparison: a version and its mR on the slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Side {
    pub version: u64,
    pub mr: f64,
}

/// The gate's rule. `candidate` is the candidate's slice mR (ignored when a loss was not
/// finite); `slice_len` the samples it was measured on.
pub fn decide(
    finite: bool,
    slice_len: usize,
    config: &GateSection,
    candidate: f64,
    live: Side,
    best: Option<Side>,
) -> Verdict {
    let tolerance = config.mr_tolerance;
    let needed = config.min_slice();
    let verdict = |promote, decision: String| Verdict { promote, decision };
    if !finite {
        return verdict(false, "rejected: a loss was not finite".into());
    }
    if !config.enabled {
        return verdict(true, "promoted: gate disabled".into());
    }
    if slice_len < needed {
        return verdict(
            false,
            format!(
                "kept: the gate slice has {slice_len} val samples, fewer than the {needed} a tolerance of {tolerance} mR needs"
            ),
        );
    }
    if !candidate.is_finite() || candidate < live.mr - tolerance {
        return verdict(
            false,
            format!(
                "rejected: mR regressed: {candidate:.2} below live v{} {:.2} minus tolerance {tolerance}",
                live.version, live.mr
            ),
        );
    }
    if let Some(best) = best
        && candidate < best.mr - tolerance
    {
        return verdict(
            false,
            format!(
                "rejected: mR regressed: {candidate:.2} below best v{} {:.2} minus tolerance {tolerance}",
                best.version, best.mr
            ),
        );
    }
    let best_text = best.map_or(String::new(), |b| {
        format!(", best v{} {:.2}", b.version, b.mr)
    });
    verdict(
        true,
        format!(
            "promoted: slice mR {candidate:.2} vs live v{} {:.2}{best_text}",
            live.version, live.mr
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(tolerance: f64) -> GateSection {
        GateSection {
            mr_tolerance: tolerance,
            ..GateSection::default()
        }
    }

    #[test]
    fn a_disabled_gate_promotes_finite_candidates_only() {
        let off = GateSection {
            enabled: false,
            ..gate(0.5)
        };
        let live = Side {
            version: 1,
            mr: 40.0,
        };
        // No slice and a collapsed candidate: promoted unevaluated, unless a loss was NaN.
        let ungated = |finite| decide(finite, 0, &off, f64::NAN, live, None);
        assert!(ungated(true).promote);
        assert_eq!(ungated(true).decision, "promoted: gate disabled");
        let refused = ungated(false);
        assert!(!refused.promote && refused.decision.contains("not finite"));
    }

    #[test]
    fn the_slice_takes_old_fraction_from_older_samples() {
        use crate::store::{NewSample, SplitPolicy, StoreOp};
        let temp = tempfile::tempdir().unwrap();
        // Every sample in val: 40 of them, in creation order.
        let policy = SplitPolicy {
            val_fraction: 1.0 - f64::EPSILON,
            seed: 3,
        };
        let store = Store::open(temp.path(), policy).unwrap();
        let ops: Vec<StoreOp> = (0..40u8)
            .map(|i| {
                StoreOp::Sample(NewSample::new(
                    vec![i; 8],
                    vec![format!("caption {i}")],
                    Default::default(),
                    "test".into(),
                    format!("s{i}"),
                    "png".into(),
                    1,
                    1,
                ))
            })
            .collect();
        store.commit_batch(&ops).unwrap();
        let val = store.split_len(SampleSplit::Val).unwrap();
        assert!(val >= 30, "{val}");
        let newest: Vec<_> = store.split_ids(SampleSplit::Val, val - 10..val).unwrap();
        let slice = |old_fraction: f64| {
            let config = GateSection {
                slice_size: 10,
                old_fraction,
                ..GateSection::default()
            };
            let (slice, rebuilt) = slice_for_run(&store, None, &config, 1).unwrap().unwrap();
            assert!(rebuilt);
            slice.samples
        };
        let from_newest =
            |ids: &[crate::store::SampleId]| ids.iter().filter(|id| newest.contains(id)).count();
        // Newest only; half and half (the default); mostly older ones.
        assert_eq!(from_newest(&slice(0.0)), 10);
        let half = slice(0.5);
        assert_eq!(half.len(), 10);
        assert!(from_newest(&half) >= 5 && from_newest(&half) < 10);
        assert!(from_newest(&slice(0.8)) < 5);
    }

    #[test]
    fn the_slice_size_follows_the_tolerance() {
        use crate::config::required_slice;
        assert_eq!(required_slice(0.5), 400);
        assert_eq!(required_slice(100.0), 2);
        assert_eq!(required_slice(1.0), 200);
        assert_eq!(required_slice(0.0), 400);
        let explicit = GateSection {
            min_val_samples: Some(1000),
            ..gate(0.5)
        };
        assert_eq!(explicit.min_slice(), 1000);
    }

    #[test]
    fn a_candidate_within_tolerance_of_live_but_not_of_best_is_refused() {
        let live = Side {
            version: 3,
            mr: 40.0,
        };
        let best = Side {
            version: 2,
            mr: 45.0,
        };
        let v = decide(true, 500, &gate(0.5), 39.8, live, Some(best));
        assert!(!v.promote);
        assert!(v.decision.contains("below best v2"), "{}", v.decision);
        // Within tolerance of both: promoted.
        let v = decide(true, 500, &gate(0.5), 44.6, live, Some(best));
        assert!(v.promote, "{}", v.decision);
        // Below live: the live comparison names it.
        let v = decide(true, 500, &gate(0.5), 39.0, live, None);
        assert!(!v.promote && v.decision.contains("below live v3"));
        // Too small a slice for the tolerance: kept.
        let v = decide(true, 100, &gate(0.5), 50.0, live, Some(best));
        assert!(
            !v.promote && v.decision.starts_with("kept"),
            "{}",
            v.decision
        );
        // Not finite.
        let v = decide(false, 500, &gate(0.5), 50.0, live, None);
        assert!(!v.promote && v.decision.contains("not finite"));
        let v = decide(true, 500, &gate(0.5), f64::NAN, live, None);
        assert!(!v.promote);
    }

    #[test]
    fn ten_promotions_each_within_tolerance_of_live_cannot_drift_past_one_tolerance() {
        let config = gate(0.5);
        let mut live = Side {
            version: 0,
            mr: 50.0,
        };
        let mut best = live;
        for version in 1..=10 {
            // Each candidate is just inside the live tolerance.
            let candidate = live.mr - 0.49;
            let v = decide(true, 1000, &config, candidate, live, Some(best));
            if v.promote {
                live = Side {
                    version,
                    mr: candidate,
                };
                if candidate > best.mr {
                    best = live;
                }
            }
        }
        assert!(live.mr >= best.mr - 0.5, "drifted to {}", live.mr);
        assert!(live.mr >= 49.5);
    }
}
