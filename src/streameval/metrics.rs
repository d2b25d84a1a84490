//! The continual-learning figures of an accuracy matrix (Lopez-Paz & Ranzato 2017, GEM;
//! Chaudhry et al. 2018 for forgetting), on mR.
//!
//! `r[i][j]` is the mR on task `j`'s evaluation split after the stream's task `i` was
//! learned (rows in stream order), `zero_shot[j]` before any training. An entry is NaN when
//! it could not be measured (a task with no evaluation images); every mean skips NaN terms,
//! and a figure with no term left is NaN (`null` in JSON).

use serde::Serialize;

/// The standard figures of one stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContinualMetrics {
    /// Mean final mR over tasks: `mean_j r[T-1][j]`.
    pub average_final: f64,
    /// Backward transfer: `mean_{j<T-1} (r[T-1][j] − r[j][j])` (negative: forgetting).
    pub backward_transfer: f64,
    /// Forward transfer: `mean_{j>0} (r[j-1][j] − zero_shot[j])` (what earlier tasks gave a
    /// task before it was seen).
    pub forward_transfer: f64,
    /// Per task: the best mR it had after being learned and before the end, minus its final
    /// mR, `max_{j≤l<T-1} r[l][j] − r[T-1][j]`; NaN for the last task (nothing after it).
    pub forgetting: Vec<f64>,
    /// Mean of `forgetting` over the tasks before the last.
    pub mean_forgetting: f64,
    /// `r[j][j]`: mR on each task right after learning it.
    pub just_learned: Vec<f64>,
}

/// Mean of the finite values, NaN when there are none.
pub fn mean_finite(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, count) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Sample standard deviation of the finite values (0 for one value, NaN for none).
pub fn std_finite(values: &[f64]) -> f64 {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    match finite.len() {
        0 => f64::NAN,
        1 => 0.0,
        n => {
            let mean = finite.iter().sum::<f64>() / n as f64;
            (finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        }
    }
}

/// The figures of `r` (T rows of T entries) and the zero-shot row (T entries).
///
/// # Panics
/// If `r` is not square or `zero_shot` does not have one entry per task.
pub fn continual_metrics(r: &[Vec<f64>], zero_shot: &[f64]) -> ContinualMetrics {
    let tasks = r.len();
    assert!(
        r.iter().all(|row| row.len() == tasks) && zero_shot.len() == tasks,
        "R must be T×T and the zero-shot row T long"
    );
    if tasks == 0 {
        return ContinualMetrics {
            average_final: f64::NAN,
            backward_transfer: f64::NAN,
            forward_transfer: f64::NAN,
            forgetting: Vec::new(),
            mean_forgetting: f64::NAN,
            just_learned: Vec::new(),
        };
    }
    let last = &r[tasks - 1];
    let forgetting: Vec<f64> = (0..tasks)
        .map(|j| {
            if j + 1 == tasks {
                return f64::NAN;
            }
            let best = (j..tasks - 1)
                .map(|l| r[l][j])
                .filter(|v| v.is_finite())
                .fold(f64::NAN, f64::max);
            best - last[j]
        })
        .collect();
    ContinualMetrics {
        average_final: mean_finite(last.iter().copied()),
        backward_transfer: mean_finite((0..tasks - 1).map(|j| last[j] - r[j][j])),
        forward_transfer: mean_finite((1..tasks).map(|j| r[j - 1][j] - zero_shot[j])),
        mean_forgetting: mean_finite(forgetting.iter().copied()),
        forgetting,
        just_learned: (0..tasks).map(|j| r[j][j]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAN: f64 = f64::NAN;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn figures_of_a_hand_made_matrix() {
        // Task 0 learned to 60, then forgotten to 50 then 40; task 1 peaks at 70 and ends
        // at 65; task 2 learned last.
        let r = vec![
            vec![60.0, 20.0, 10.0],
            vec![50.0, 70.0, 30.0],
            vec![40.0, 65.0, 80.0],
        ];
        let zero = vec![10.0, 15.0, 5.0];
        let m = continual_metrics(&r, &zero);
        assert!(close(m.average_final, (40.0 + 65.0 + 80.0) / 3.0));
        assert!(close(
            m.backward_transfer,
            ((40.0 - 60.0) + (65.0 - 70.0)) / 2.0
        ));
        assert!(close(
            m.forward_transfer,
            ((20.0 - 15.0) + (30.0 - 5.0)) / 2.0
        ));
        assert!(close(m.forgetting[0], 20.0));
        assert!(close(m.forgetting[1], 5.0));
        assert!(m.forgetting[2].is_nan());
        assert!(close(m.mean_forgetting, 12.5));
        assert_eq!(m.just_learned, vec![60.0, 70.0, 80.0]);
    }

    #[test]
    fn forgetting_takes_the_best_earlier_value_and_can_be_negative() {
        // Task 0 improves after it was learned (later tasks helped it): its peak is the row
        // after, and the final is above the first value; then it ties with its peak.
        let r = vec![
            vec![30.0, 0.0, 0.0],
            vec![50.0, 40.0, 0.0],
            vec![50.0, 45.0, 60.0],
        ];
        let m = continual_metrics(&r, &[0.0; 3]);
        // A tie between the peak and the final is no forgetting.
        assert!(close(m.forgetting[0], 0.0));
        // Ending above every earlier value is negative forgetting (improvement).
        assert!(close(m.forgetting[1], -5.0));
        assert!(close(
            m.backward_transfer,
            ((50.0 - 30.0) + (45.0 - 40.0)) / 2.0
        ));
    }

    #[test]
    fn a_task_never_learned_or_never_measured_is_skipped_not_zero() {
        // Task 1 has no evaluation images (NaN column); the gate refused every candidate of
        // task 2's run, so the row after it repeats the row before (never learned: its
        // diagonal is what the earlier adapter gave it).
        let r = vec![
            vec![60.0, NAN, 10.0],
            vec![55.0, NAN, 12.0],
            vec![55.0, NAN, 12.0],
        ];
        let m = continual_metrics(&r, &[10.0, NAN, 10.0]);
        assert!(close(m.average_final, (55.0 + 12.0) / 2.0));
        assert!(close(m.backward_transfer, 55.0 - 60.0));
        assert!(m.forgetting[1].is_nan());
        assert!(close(m.forgetting[0], 5.0));
        assert!(close(m.mean_forgetting, 5.0));
        // Only task 2's term exists (task 1's zero-shot is NaN).
        assert!(close(m.forward_transfer, 12.0 - 10.0));
        assert!(close(m.just_learned[2], 12.0));
        // One task: nothing to forget or transfer.
        let one = continual_metrics(&[vec![42.0]], &[1.0]);
        assert!(close(one.average_final, 42.0));
        assert!(one.backward_transfer.is_nan() && one.forward_transfer.is_nan());
        assert!(one.mean_forgetting.is_nan());
    }

    #[test]
    fn mean_and_std_skip_non_finite_values() {
        assert!(close(mean_finite([1.0, NAN, 3.0]), 2.0));
        assert!(mean_finite([NAN]).is_nan());
        assert!(close(std_finite(&[2.0, 4.0, NAN]), 2.0_f64.sqrt()));
        assert_eq!(std_finite(&[5.0]), 0.0);
        assert!(std_finite(&[]).is_nan());
    }
}
