//! The stream evaluation's outputs: one JSON object (documented in docs/continual.md), a
//! terminal table of mean ± std over seeds and orders, and an SVG with the R matrices and
//! the reference variant's mR per task over the stream.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::metrics::{mean_finite, std_finite};
use super::{EvalSplit, Plan, StreamRun};

/// Mean and sample standard deviation over runs (NaN, `null` in JSON, when unmeasured).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
}

impl MeanStd {
    pub fn of(values: &[f64]) -> Self {
        Self {
            mean: mean_finite(values.iter().copied()),
            std: std_finite(values),
        }
    }

    fn text(&self) -> String {
        if self.mean.is_finite() {
            format!("{:.2} ± {:.2}", self.mean, self.std)
        } else {
            "–".into()
        }
    }
}

/// A variant's (or bound's) figures over every seed and order.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    /// `stream` (through the daemon's path) or `bound` (zero-shot, joint).
    pub kind: &'static str,
    pub overrides: BTreeMap<String, String>,
    pub runs: usize,
    pub average_final: MeanStd,
    pub backward_transfer: MeanStd,
    pub forward_transfer: MeanStd,
    pub mean_forgetting: MeanStd,
    /// Forgetting of each task (by name), over the runs in which it was not last.
    pub forgetting_by_task: BTreeMap<String, MeanStd>,
    pub training_steps: MeanStd,
    pub images_reembedded: MeanStd,
    pub seconds: MeanStd,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub name: String,
    pub streamed_images: usize,
    pub eval_images: usize,
}

/// Everything a stream evaluation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tasks: Vec<TaskInfo>,
    pub eval_split: EvalSplit,
    pub seeds: Vec<u64>,
    pub orders: Vec<Vec<String>>,
    /// One per variant and bound, in the order they ran.
    pub summaries: Vec<Summary>,
    /// Every stream and bound measurement.
    pub runs: Vec<StreamRun>,
}

impl Report {
    pub fn new(plan: &Plan, runs: Vec<StreamRun>) -> Self {
        let mut names: Vec<String> = Vec::new();
        for run in &runs {
            if !names.contains(&run.variant) {
                names.push(run.variant.clone());
            }
        }
        let summaries = names
            .iter()
            .map(|name| {
                let of: Vec<&StreamRun> = runs.iter().filter(|r| &r.variant == name).collect();
                let figure = |f: &dyn Fn(&StreamRun) -> f64| {
                    MeanStd::of(&of.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                let metric = |f: &dyn Fn(&super::metrics::ContinualMetrics) -> f64| {
                    figure(&|r: &StreamRun| r.metrics.as_ref().map_or(f64::NAN, f))
                };
                let mut by_task: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                for run in &of {
                    if let Some(metrics) = &run.metrics {
                        for (task, value) in run.order.iter().zip(&metrics.forgetting) {
                            if value.is_finite() {
                                by_task.entry(task.clone()).or_default().push(*value);
                            }
                        }
                    }
                }
                let variant = plan.variants.iter().find(|v| &v.name == name);
                Summary {
                    name: name.clone(),
                    kind: if of.iter().any(|r| r.metrics.is_some()) {
                        "stream"
                    } else {
                        "bound"
                    },
                    overrides: variant
                        .map_or_else(BTreeMap::new, |v| super::overrides_map(&v.overrides)),
                    runs: of.len(),
                    average_final: figure(&|r| r.average_final),
                    backward_transfer: metric(&|m| m.backward_transfer),
                    forward_transfer: metric(&|m| m.forward_transfer),
                    mean_forgetting: metric(&|m| m.mean_forgetting),
                    forgetting_by_task: by_task
                        .into_iter()
                        .map(|(task, values)| (task, MeanStd::of(&values)))
                        .collect(),
                    training_steps: figure(&|r| r.compute.training_steps as f64),
                    images_reembedded: figure(&|r| r.compute.images_reembedded as f64),
                    seconds: figure(&|r| r.compute.seconds),
                }
            })
            .collect();
        Self {
            tasks: plan
                .tasks
                .iter()
                .map(|t| TaskInfo {
                    name: t.name.clone(),
                    streamed_images: t.stream.images.len(),
                    eval_images: t.eval().images.len(),
                })
                .collect(),
            eval_split: plan.eval_split,
            seeds: plan.seeds.clone(),
            orders: plan
                .orders
                .iter()
                .map(|o| o.iter().map(|&i| plan.tasks[i].name.clone()).collect())
                .collect(),
            summaries,
            runs,
        }
    }

    pub fn summary(&self, name: &str) -> Option<&Summary> {
        self.summaries.iter().find(|s| s.name == name)
    }

    /// The terminal table: one line per variant and bound.
    pub fn table(&self) -> String {
        let header = [
            "variant",
            "runs",
            "final mR",
            "BWT",
            "forgetting",
            "FWT",
            "steps",
            "re-embedded",
            "seconds",
        ];
        let rows: Vec<Vec<String>> = self
            .summaries
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.runs.to_string(),
                    s.average_final.text(),
                    s.backward_transfer.text(),
                    s.mean_forgetting.text(),
                    s.forward_transfer.text(),
                    format!("{:.0}", s.training_steps.mean),
                    format!("{:.0}", s.images_reembedded.mean),
                    format!("{:.1}", s.seconds.mean),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].chars().count())
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, &w))| {
                    let pad = w - cell.chars().count();
                    if c == 0 {
                        format!("{cell}{}", " ".repeat(pad))
                    } else {
                        format!("{}{cell}", " ".repeat(pad))
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut out = line(header.iter().map(|h| h.to_string()).collect());
        out.push('\n');
        for row in rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "mR in points, mean ± std over {} run(s) each ({} split); tasks: {}",
            self.seeds.len() * self.orders.len(),
            match self.eval_split {
                EvalSplit::Test => "test",
                EvalSplit::Seen => "seen",
            },
            self.tasks
                .iter()
                .map(|t| format!("{} ({}+{})", t.name, t.streamed_images, t.eval_images))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out
    }

    /// Mean `R` of a stream variant over the seeds of the first order.
    fn mean_matrix(&self, variant: &str) -> Option<Vec<Vec<f64>>> {
        let order = self.orders.first()?;
        let runs: Vec<&StreamRun> = self
            .runs
            .iter()
            .filter(|r| r.variant == variant && &r.order == order && r.metrics.is_some())
            .collect();
        let first = runs.first()?;
        let (rows, cols) = (first.r.len(), first.r[0].len());
        Some(
            (0..rows)
                .map(|i| {
                    (0..cols)
                        .map(|j| mean_finite(runs.iter().map(|r| r.r[i][j])))
                        .collect()
                })
                .collect(),
        )
    }

    /// An SVG: one R heatmap per stream variant (mean over seeds, first order), then the
    /// first variant's mR per task after each task of the stream.
    pub fn svg(&self) -> String {
        let streams: Vec<&Summary> = self
            .summaries
            .iter()
            .filter(|s| s.kind == "stream")
            .collect();
        let order = self.orders.first().cloned().unwrap_or_default();
        let tasks = order.len().max(1);
        let cell = 36.0;
        let label = 90.0;
        let panel = (label + cell * tasks as f64 + 30.0).max(220.0);
        let chart_w = 420.0;
        let width = (panel * streams.len() as f64).max(chart_w + 40.0);
        let top = 56.0;
        let heat_h = top + cell * tasks as f64 + 40.0;
        let height = heat_h + 260.0;
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
        );
        svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
        let values: Vec<f64> = streams
            .iter()
            .filter_map(|s| self.mean_matrix(&s.name))
            .flatten()
            .flatten()
            .filter(|v| v.is_finite())
            .collect();
        let max = values.iter().copied().fold(1.0f64, f64::max);
        // Colours span the values shown, so that a few points of forgetting are visible.
        let min = values.iter().copied().fold(max, f64::min);
        let span = (max - min).max(1e-9);
        let _ = write!(
            svg,
            r#"<text x="4" y="16">R[i][j]: mR on task j (column) after task i (row), mean over seeds, order {}</text>"#,
            escape(&order.join(" → "))
        );
        for (p, summary) in streams.iter().enumerate() {
            let Some(matrix) = self.mean_matrix(&summary.name) else {
                continue;
            };
            let x0 = p as f64 * panel + label;
            let _ = write!(
                svg,
                r#"<text x="{:.0}" y="{:.0}" font-weight="bold">{}</text>"#,
                x0,
                top - 22.0,
                escape(&summary.name)
            );
            for (j, name) in order.iter().enumerate() {
                let _ = write!(
                    svg,
                    r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">{}</text>"#,
                    x0 + cell * (j as f64 + 0.5),
                    top - 6.0,
                    escape(short(name))
                );
                let _ = write!(
                    svg,
                    r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                    x0 - 4.0,
                    top + cell * (j as f64 + 0.6),
                    escape(short(name))
                );
            }
            for (i, row) in matrix.iter().enumerate() {
                for (j, value) in row.iter().enumerate() {
                    let (x, y) = (x0 + cell * j as f64, top + cell * i as f64);
                    let fill = if value.is_finite() {
                        let t = ((value - min) / span).clamp(0.0, 1.0);
                        let (r, g) = (215.0 * (1.0 - t), 230.0 - 110.0 * t);
                        format!("rgb({r:.0},{g:.0},255)")
                    } else {
                        "#eee".into()
                    };
                    let _ = write!(
                        svg,
                        r#"<rect x="{x:.0}" y="{y:.0}" width="{cell}" height="{cell}" fill="{fill}" stroke="white"/><text x="{:.0}" y="{:.0}" text-anchor="middle">{}</text>"#,
                        x + cell / 2.0,
                        y + cell / 2.0 + 4.0,
                        if value.is_finite() {
                            format!("{value:.0}")
                        } else {
                            "–".into()
                        }
                    );
                }
            }
        }
        // mR per task over the stream, for the first stream variant.
        if let Some(matrix) = streams.first().and_then(|s| self.mean_matrix(&s.name)) {
            let (x0, y0, w, h) = (50.0, heat_h + 20.0, chart_w - 60.0, 180.0);
            let _ = write!(
                svg,
                r#"<text x="10" y="{:.0}" font-weight="bold">{}: mR per task after each task of the stream</text>"#,
                y0 - 6.0,
                escape(&streams[0].name)
            );
            let _ = write!(
                svg,
                r##"<line x1="{x0}" y1="{:.0}" x2="{:.0}" y2="{:.0}" stroke="#444"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{:.0}" stroke="#444"/><text x="{:.0}" y="{:.0}" text-anchor="end">{max:.0}</text><text x="{:.0}" y="{:.0}" text-anchor="end">0</text>"##,
                y0 + h,
                x0 + w,
                y0 + h,
                y0 + h,
                x0 - 4.0,
                y0 + 4.0,
                x0 - 4.0,
                y0 + h
            );
            let colours = [
                "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
            ];
            let step = w / (matrix.len().max(2) - 1) as f64;
            for (i, name) in order.iter().enumerate() {
                let _ = write!(
                    svg,
                    r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">after {}</text>"#,
                    x0 + step * i as f64,
                    y0 + h + 14.0,
                    escape(short(name))
                );
            }
            for j in 0..tasks {
                let colour = colours[j % colours.len()];
                let points: Vec<String> = matrix
                    .iter()
                    .enumerate()
                    .filter(|(_, row)| row[j].is_finite())
                    .map(|(i, row)| {
                        format!(
                            "{:.1},{:.1}",
                            x0 + step * i as f64,
                            y0 + h - h * (row[j] / max).clamp(0.0, 1.0)
                        )
                    })
                    .collect();
                let _ = write!(
                    svg,
                    r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/><text x="{:.0}" y="{:.0}" fill="{colour}">{}</text>"#,
                    points.join(" "),
                    x0 + w + 8.0,
                    y0 + 12.0 + 14.0 * j as f64,
                    escape(order.get(j).map_or("", String::as_str))
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn short(name: &str) -> &str {
    let end = name.char_indices().nth(10).map_or(name.len(), |(i, _)| i);
    &name[..end]
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
