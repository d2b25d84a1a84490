//! Remote-sensing retrieval datasets: Karpathy-style JSON (RSICD, UCM, Sydney, RSITMD) and the
//! AMFMN "precomp" text files, validated up front with every problem listed in one report.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Dataset split of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// Karpathy split names: `restval` is training data (as in Karpathy's COCO splits),
    /// `valid`/`validation` are `val`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "train" | "restval" => Some(Self::Train),
            "val" | "valid" | "validation" => Some(Self::Val),
            "test" => Some(Self::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        })
    }
}

/// One image and its captions.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetImage {
    /// Path relative to the image directory.
    pub filename: String,
    pub split: Split,
    /// At least one, none empty.
    pub captions: Vec<String>,
    /// The entry's other scalar fields, as text (Karpathy JSON: e.g. rs-mini's `source`,
    /// RSITMD's keywords are not scalar and are left out); empty for precomp files.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// A validated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<DatasetImage>,
    pub image_dir: PathBuf,
}

/// Everything wrong with a dataset, found before any work starts.
#[derive(Debug)]
pub struct DatasetReport {
    pub source: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for DatasetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dataset {} has {} problem(s):",
            self.source.display(),
            self.problems.len()
        )?;
        for problem in self.problems.iter().take(50) {
            writeln!(f, "  - {problem}")?;
        }
        if self.problems.len() > 50 {
            writeln!(f, "  … and {} more", self.problems.len() - 50)?;
        }
        Ok(())
    }
}

impl std::error::Error for DatasetReport {}

impl Dataset {
    /// Loads and validates a dataset: a Karpathy JSON file, or an AMFMN precomp directory
    /// (or one of its `*_caps.txt` files). Images are looked up in `image_dir`.
    pub fn load(source: &Path, image_dir: &Path) -> Result<Self, DatasetReport> {
        let mut problems = Vec::new();
        let images = if source.is_dir()
            || source
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("_caps.txt"))
        {
            let dir = if source.is_dir() {
                source
            } else {
                source.parent().unwrap_or(Path::new("."))
            };
            parse_precomp(dir, &mut problems)
        } else {
            parse_karpathy(source, &mut problems)
        };
        check_images(&images, image_dir, &mut problems);
        if problems.is_empty() && images.is_empty() {
            problems.push("no images".into());
        }
        if problems.is_empty() {
            Ok(Self {
                images,
                image_dir: image_dir.to_path_buf(),
            })
        } else {
            Err(DatasetReport {
                source: source.to_path_buf(),
                problems,
            })
        }
    }

    /// Every caption of a dataset's annotations, without looking at its images (text
    /// inputs for benchmarks): the same parsers as [`Dataset::load`].
    pub fn captions(source: &Path) -> Result<Vec<String>, DatasetReport> {
        let mut problems = Vec::new();
        let images = if source.is_dir() {
            parse_precomp(source, &mut problems)
        } else {
            parse_karpathy(source, &mut problems)
        };
        if !problems.is_empty() {
            return Err(DatasetReport {
                source: source.to_path_buf(),
                problems,
            });
        }
        Ok(images
            .into_iter()
            .flat_map(|image| image.captions)
            .collect())
    }

    /// Images of one split.
    pub fn split(&self, split: Split) -> Vec<&DatasetImage> {
        self.images.iter().filter(|i| i.split == split).collect()
    }

    pub fn path_of(&self, image: &DatasetImage) -> PathBuf {
        self.image_dir.join(&image.filename)
    }
}

/// Duplicate names, empty captions, images without captions, missing/unreadable files.
fn check_images(images: &[DatasetImage], image_dir: &Path, problems: &mut Vec<String>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, image) in images.iter().enumerate() {
        if let Some(first) = seen.insert(&image.filename, index) {
            problems.push(format!(
                "duplicate filename {} (images {first} and {index})",
                image.filename
            ));
        }
        if image.captions.is_empty() {
            problems.push(format!("image {} has no captions", image.filename));
        }
        for (n, caption) in image.captions.iter().enumerate() {
            if caption.trim().is_empty() {
                problems.push(format!("image {}: caption {n} is empty", image.filename));
            }
        }
        let path = image_dir.join(&image.filename);
        match image::ImageReader::open(&path).and_then(|r| r.with_guessed_format()) {
            Err(error) => problems.push(format!("image {}: {error}", path.display())),
            Ok(reader) => {
                if reader.format().is_none() {
                    problems.push(format!(
                        "image {}: not a recognisable image",
                        path.display()
                    ));
                } else if let Err(error) = reader.into_dimensions() {
                    problems.push(format!("image {}: unreadable: {error}", path.display()));
                }
            }
        }
    }
}

/// Karpathy JSON: `{"images": [{"filename", "split", "sentences": [{"raw", …}], …}]}`.
/// Extra fields are ignored; `filepath`, when present, is joined before `filename`.
fn parse_karpathy(path: &Path, problems: &mut Vec<String>) -> Vec<DatasetImage> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            problems.push(format!("cannot read {}: {error}", path.display()));
            return Vec::new();
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(error) => {
            problems.push(format!(
                "{} is not valid JSON at line {}, column {}: {error}",
                path.display(),
                error.line(),
                error.column()
            ));
            return Vec::new();
        }
    };
    let Some(entries) = value.get("images").and_then(|v| v.as_array()) else {
        problems.push(format!("{}: missing array field `images`", path.display()));
        return Vec::new();
    };
    let mut images = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let field = |name: &str| format!("images[{index}].{name}");
        let Some(filename) = entry.get("filename").and_then(|v| v.as_str()) else {
            problems.push(format!("{}: missing or non-string", field("filename")));
            continue;
        };
        let filename = match entry.get("filepath").and_then(|v| v.as_str()) {
            Some(dir) if !dir.is_empty() => format!("{dir}/{filename}"),
            _ => filename.to_string(),
        };
        let split = match entry.get("split").and_then(|v| v.as_str()) {
            Some(name) => match Split::parse(name) {
                Some(split) => split,
                None => {
                    problems.push(format!(
                        "{}: unknown split `{name}` (expected train, restval, val or test)",
                        field("split")
                    ));
                    continue;
                }
            },
            None => {
                problems.push(format!("{}: missing or non-string", field("split")));
                continue;
            }
        };
        let Some(sentences) = entry.get("sentences").and_then(|v| v.as_array()) else {
            problems.push(format!("{}: missing or not an array", field("sentences")));
            continue;
        };
        let mut captions = Vec::with_capacity(sentences.len());
        for (n, sentence) in sentences.iter().enumerate() {
            match sentence.get("raw").and_then(|v| v.as_str()) {
                Some(raw) => captions.push(raw.to_string()),
                None => problems.push(format!(
                    "{}: missing or non-string",
                    field(&format!("sentences[{n}].raw"))
                )),
            }
        }
        let tags = entry
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| !KARPATHY_FIELDS.contains(&key.as_str()))
            .filter_map(|(key, value)| {
                let text = match value {
                    serde_json::Value::String(text) => text.clone(),
                    serde_json::Value::Number(number) => number.to_string(),
                    serde_json::Value::Bool(flag) => flag.to_string(),
                    _ => return None,
                };
                Some((key.clone(), text))
            })
            .collect();
        images.push(DatasetImage {
            filename,
            split,
            captions,
            tags,
        });
    }
    images
}

/// Fields of a Karpathy entry that are the image itself, not tags of it.
const KARPATHY_FIELDS: &[&str] = &["filename", "filepath", "split", "sentences", "sentids"];

/// AMFMN precomp: for each split `S` in train/val/test present, `S_caps.txt` (one caption per
/// line) and `S_filename.txt` (one name per image, or one per caption line).
fn parse_precomp(dir: &Path, problems: &mut Vec<String>) -> Vec<DatasetImage> {
    let mut images = Vec::new();
    let mut found = false;
    for split in [Split::Train, Split::Val, Split::Test] {
        let caps_path = dir.join(format!("{split}_caps.txt"));
        let names_path = dir.join(format!("{split}_filename.txt"));
        if !caps_path.exists() && !names_path.exists() {
            continue;
        }
        found = true;
        let read = |path: &Path, problems: &mut Vec<String>| -> Option<Vec<String>> {
            match std::fs::read_to_string(path) {
                Ok(text) => Some(
                    text.lines()
                        .map(|l| l.trim_end_matches('\r').to_string())
                        .collect(),
                ),
                Err(error) => {
                    problems.push(format!("cannot read {}: {error}", path.display()));
                    None
                }
            }
        };
        let (Some(captions), Some(names)) =
            (read(&caps_path, problems), read(&names_path, problems))
        else {
            continue;
        };
        let names: Vec<String> = names.into_iter().filter(|n| !n.trim().is_empty()).collect();
        let captions: Vec<String> = {
            // A trailing newline is not an empty caption.
            let mut captions = captions;
            while captions.last().is_some_and(|c| c.trim().is_empty()) {
                captions.pop();
            }
            captions
        };
        if names.len() == captions.len() {
            // One name per caption line: consecutive lines with the same name are one image.
            for (line, (name, caption)) in names.iter().zip(&captions).enumerate() {
                if caption.trim().is_empty() {
                    problems.push(format!(
                        "{}:{}: empty caption",
                        caps_path.display(),
                        line + 1
                    ));
                }
                match images.last_mut() {
                    Some(DatasetImage {
                        filename,
                        split: s,
                        captions,
                        ..
                    }) if filename == name && *s == split => captions.push(caption.clone()),
                    _ => images.push(DatasetImage {
                        filename: name.clone(),
                        split,
                        captions: vec![caption.clone()],
                        tags: Default::default(),
                    }),
                }
            }
        } else if !names.is_empty() && captions.len().is_multiple_of(names.len()) {
            let per_image = captions.len() / names.len();
            for (index, name) in names.iter().enumerate() {
                let chunk = &captions[index * per_image..(index + 1) * per_image];
                for (offset, caption) in chunk.iter().enumerate() {
                    if caption.trim().is_empty() {
                        problems.push(format!(
                            "{}:{}: empty caption",
                            caps_path.display(),
                            index * per_image + offset + 1
                        ));
                    }
                }
                images.push(DatasetImage {
                    filename: name.clone(),
                    split,
                    captions: chunk.to_vec(),
                    tags: Default::default(),
                });
            }
        } else {
            problems.push(format!(
                "{} has {} lines but {} has {} names: expected one name per caption or an equal number of captions per name",
                caps_path.display(),
                captions.len(),
                names_path.display(),
                names.len()
            ));
        }
    }
    if !found {
        problems.push(format!(
            "{}: no train_caps.txt/train_filename.txt (or val_, test_) files",
            dir.display()
        ));
    }
    images
}

/// Reads, decodes and CLIP-preprocesses one image file (`[3, size, size]`).
pub fn load_pixels(
    path: &Path,
    size: usize,
    max_pixels: u64,
) -> Result<Vec<f32>, crate::model::preprocess::ImageError> {
    use crate::model::preprocess::{ImageError, ImageLimits, load_image};
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| ImageError::Decode {
        name: name.clone(),
        reason: error.to_string(),
    })?;
    load_image(
        &bytes,
        &name,
        &ImageLimits::with_max_pixels(max_pixels),
        size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn png(dir: &Path, name: &str) {
        let image = image::RgbImage::new(4, 4);
        image.save(dir.join(name)).unwrap();
    }

    #[test]
    fn karpathy_with_every_problem_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "a.png");
        png(dir.path(), "b.png");
        let json = r#"{"images": [
            {"filename": "a.png", "split": "train", "sentences": [{"raw": "one"}, {"raw": "two"}], "extra": 1},
            {"filename": "b.png", "split": "restval", "sentences": [{"raw": "  "}]},
            {"filename": "a.png", "split": "test", "sentences": [{"raw": "dup"}]},
            {"filename": "c.png", "split": "holdout", "sentences": [{"raw": "x"}]},
            {"filename": "missing.png", "split": "val", "sentences": [{"raw": 3}]}
        ]}"#;
        let path = write(dir.path(), "data.json", json);
        let report = Dataset::load(&path, dir.path()).unwrap_err();
        let text = report.to_string();
        assert!(text.contains("caption 0 is empty"), "{text}");
        assert!(text.contains("duplicate filename a.png"), "{text}");
        assert!(
            text.contains("images[3].split: unknown split `holdout`"),
            "{text}"
        );
        assert!(text.contains("images[4].sentences[0].raw"), "{text}");
        assert!(text.contains("missing.png"), "{text}");
        assert!(text.contains("image missing.png has no captions"), "{text}");
        assert_eq!(report.problems.len(), 6, "{text}");
    }

    #[test]
    fn malformed_json_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "bad.json",
            "{\"images\": [\n  {\"filename\": }\n]}",
        );
        let text = Dataset::load(&path, dir.path()).unwrap_err().to_string();
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn precomp_with_names_per_image_and_per_caption() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.png", "c.png"] {
            png(dir.path(), name);
        }
        write(dir.path(), "train_caps.txt", "a1\na2\nb1\nb2\n");
        write(dir.path(), "train_filename.txt", "a.png\nb.png\n");
        write(dir.path(), "test_caps.txt", "c1\nc2\nc3\n");
        write(dir.path(), "test_filename.txt", "c.png\nc.png\nc.png\n");
        let dataset = Dataset::load(dir.path(), dir.path()).unwrap();
        assert_eq!(dataset.images.len(), 3);
        assert_eq!(dataset.images[1].captions, vec!["b1", "b2"]);
        assert_eq!(dataset.split(Split::Test)[0].captions.len(), 3);
        assert_eq!(dataset.split(Split::Train).len(), 2);
    }

    #[test]
    fn precomp_count_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train_caps.txt", "a\nb\nc\n");
        write(dir.path(), "train_filename.txt", "x.png\ny.png\n");
        let text = Dataset::load(dir.path(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(text.contains("has 3 lines but"), "{text}");
    }
}
