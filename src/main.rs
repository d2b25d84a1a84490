//! The `rsitrd` command line: parses arguments, sets up logging, calls into the library.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use rsitrd::config::Config;
use rsitrd::data::{Dataset, Split};
use rsitrd::model::LossKind;
use rsitrd::model::config::backbone_params;
use rsitrd::model::device::{BackbonePrecision, DeviceChoice};
use rsitrd::model::kernels::ModelBackend;

use rsitrd::model::{AdapterConfig, ClipConfig, Embedder, hub};
use rsitrd::train::offline::{self, TrainConfig};
use rsitrd::{bench, with_backend};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Parser, Debug)]
#[command(
    name = "rsitrd",
    version,
    about = "Remote-sensing image-text retrieval daemon (CLIP + MRS-Adapter)"
)]
struct Cli {
    /// Configuration file (see config/rsitrd.toml); flags override it, and
    /// RSITRD__SECTION__KEY environment variables override the file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print total and trainable parameter counts (reads only DIR/config.json).
    Params {
        /// Model directory (HF layout) or hub id such as openai/clip-vit-base-patch32.
        #[arg(long, conflicts_with = "arch")]
        model: Option<String>,
        /// An open_clip architecture instead of a model: ViT-B-32, ViT-B-16, ViT-L-14 or
        /// ViT-L-14-336 (nothing is downloaded).
        #[arg(long)]
        arch: Option<String>,
        /// Adapter bottleneck width (default: the paper's 64, smaller for tiny backbones).
        #[arg(long)]
        bottleneck: Option<usize>,
        /// Width of the shared up layer (default 64).
        #[arg(long)]
        shared_width: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Embed images and captions; one JSON line per input, in the order given.
    Embed {
        /// Model directory (HF layout) or hub id such as openai/clip-vit-base-patch32
        /// (downloaded once into the cache). Default: model.dir of the configuration.
        #[arg(long)]
        model: Option<String>,
        /// Adapter checkpoint (safetensors written by `rsitrd train`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// cpu, cuda or cuda:N. Default: model.device of the configuration.
        #[arg(long)]
        device: Option<DeviceChoice>,
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        #[arg(long = "text")]
        texts: Vec<String>,
        /// Print JSON lines (the only output format; accepted for clarity).
        #[arg(long)]
        json: bool,
        /// Largest accepted image in pixels.
        /// Largest accepted image in pixels. Default: model.max_pixels.
        #[arg(long)]
        max_pixels: Option<u64>,
    },
    /// Train the adapter on a dataset (the paper's recipe by default).
    Train {
        /// Model directory (HF layout) or hub id. Default: model.dir of the configuration.
        #[arg(long)]
        model: Option<String>,
        /// Karpathy JSON file, or AMFMN precomp directory.
        #[arg(long)]
        dataset: PathBuf,
        /// Directory the dataset's image file names are relative to.
        #[arg(long)]
        images: PathBuf,
        /// Output directory (checkpoints, log, plot, resumable state).
        #[arg(long)]
        out: PathBuf,
        /// Adapter checkpoint to continue from.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// cpu, cuda or cuda:N. Default: model.device of the configuration.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// f32, bf16 or f16: float type of the frozen blocks' products (bf16/f16 for GPUs).
        /// Default: model.backbone_precision of the configuration.
        #[arg(long)]
        backbone_precision: Option<BackbonePrecision>,
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 2e-4)]
        lr: f64,
        #[arg(long, default_value_t = 0.7)]
        lr_decay: f64,
        #[arg(long, default_value_t = 20)]
        lr_decay_every: usize,
        /// Held-out fraction of training images when the dataset has no val split
        /// (`--protocol holdout`).
        #[arg(long, default_value_t = 0.2)]
        val_fraction: f64,
        /// `holdout`: select the checkpoint on held-out training images when there is no val
        /// split; `paper`: train on every training image and evaluate on test each epoch, as
        /// the paper does (docs/training.md).
        #[arg(long, value_enum, default_value = "holdout")]
        protocol: rsitrd::train::offline::Protocol,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value = "hmmc")]
        loss: LossKind,
        /// Adapter bottleneck (default 64, smaller for tiny backbones).
        #[arg(long)]
        bottleneck: Option<usize>,
        /// Width of the shared up layer (default 64).
        #[arg(long)]
        shared_width: Option<usize>,
        /// Continue an interrupted run in --out.
        #[arg(long)]
        resume: bool,
        /// Largest accepted image in pixels. Default: model.max_pixels.
        #[arg(long)]
        max_pixels: Option<u64>,
    },
    /// Evaluate retrieval (R@1/5/10 both ways, mR) on a dataset split.
    Eval {
        /// Model directory (HF layout) or hub id. Default: model.dir of the configuration.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        /// cpu, cuda or cuda:N. Default: model.device of the configuration.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Largest accepted image in pixels. Default: model.max_pixels.
        #[arg(long)]
        max_pixels: Option<u64>,
    },
    /// The daemon: ingestion, continual training with the promotion gate, the index and the
    /// HTTP API, until SIGINT or SIGTERM (systemd Type=notify).
    Run,
    /// A stateless query replica: search and embed only, against the primary's Qdrant server
    /// (`[index] backend = "remote"`) and adapter directory, following the alias.
    Serve,
    /// Switch serving back to an earlier kept adapter/index version (through the running
    /// daemon's API, or directly when it is stopped).
    Rollback {
        /// Version to serve (default: the previous live version).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Run the ingestion sources (inbox directory, AMQP queue) into the store until SIGINT or
    /// SIGTERM.
    Ingest,
    /// Publish a Karpathy dataset to the AMQP queue (persistent, publisher confirms).
    Publish {
        /// Karpathy JSON file (or AMFMN precomp directory).
        #[arg(long)]
        dataset: PathBuf,
        /// Directory the dataset's image file names are relative to.
        #[arg(long)]
        images: PathBuf,
    },
    /// Validate a Karpathy dataset and write it straight into the store.
    Import {
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        images: PathBuf,
    },
    /// List the quarantine (stored samples that a stage could not use, with the stage and
    /// the reason), or release samples from it once fixed so that they are embedded again
    /// (through the running daemon's API, or directly when it is stopped).
    Quarantine {
        /// Release these sample ids (64 hex digits each; repeat the flag).
        #[arg(long, value_name = "SAMPLE_ID")]
        release: Vec<String>,
        /// Release every quarantined sample.
        #[arg(long, conflicts_with = "release")]
        release_all: bool,
        /// One JSON object (the default is one line per sample).
        #[arg(long)]
        json: bool,
    },
    /// Store counts (readable while the daemon runs).
    Stats {
        /// One JSON object (the default is one `key: value` per line).
        #[arg(long)]
        json: bool,
    },
    /// Measure AMQP → store ingestion (throughput, publish → commit latency) next to the
    /// broker alone and validation alone; uses a throw-away queue and store.
    BenchIngest {
        /// Karpathy dataset whose images are sent (each made unique per message).
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        images: PathBuf,
        /// Messages for the throughput runs.
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Steady publish rate (messages/s) for the latency run.
        #[arg(long, default_value_t = 200.0)]
        latency_rate: f64,
        /// Messages in the latency run.
        #[arg(long, default_value_t = 1000)]
        latency_messages: usize,
    },
    /// Fill the configured store with synthetic samples (tiny unique PNGs, one caption each)
    /// through the store's own commit path: a corpus-scale ledger for benchmarks.
    FillStore {
        #[arg(long)]
        samples: u64,
        /// Samples per commit.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
    },
    /// Write a random-weight CLIP in the HuggingFace layout (for full-size benchmarks without
    /// downloading weights): config.json from --like, model.safetensors random.
    RandomModel {
        /// Directory holding the config.json to copy (e.g. tests/fixtures/vit-b-32).
        #[arg(long)]
        like: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Stream datasets task by task through the daemon's continual path (train, gate,
    /// promote) and measure what it learns and forgets, with zero-shot, joint and naive
    /// bounds (docs/continual.md).
    StreamEval {
        /// Model directory (HF layout) or hub id. Default: model.dir of the configuration.
        #[arg(long)]
        model: Option<String>,
        /// Karpathy JSON file (repeatable, each with its --images, in the same order).
        #[arg(long, required = true)]
        dataset: Vec<PathBuf>,
        #[arg(long, required = true)]
        images: Vec<PathBuf>,
        /// How the data becomes tasks: dataset, field:NAME (a field of the entries, e.g.
        /// field:source) or time:N (N chunks in file order).
        #[arg(long, default_value = "dataset")]
        tasks: rsitrd::streameval::TaskSplit,
        /// A task order, comma-separated task names (repeatable). Default: as they appear.
        #[arg(long)]
        order: Vec<String>,
        /// Seeds, comma-separated: every order runs once per seed.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        seeds: Vec<u64>,
        /// Another configuration to stream with: NAME:section.key=value,… (repeatable). The
        /// configuration as loaded always runs, as `configured`.
        #[arg(long)]
        variant: Vec<String>,
        /// Skip the joint and naive bounds (zero-shot is always measured).
        #[arg(long)]
        no_bounds: bool,
        /// test: each task's test images; seen: its streamed images (retention).
        #[arg(long, value_enum, default_value = "test")]
        eval_split: rsitrd::streameval::EvalSplit,
        /// cpu, cuda or cuda:N. Default: model.device of the configuration.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// Directory for report.json and report.svg.
        #[arg(long)]
        out: PathBuf,
        /// Start every stream from an untrained adapter of this bottleneck instead of the
        /// backbone's default shape (model.adapter must then be unset).
        #[arg(long)]
        bottleneck: Option<usize>,
        /// With --bottleneck: the shared up layer's width.
        #[arg(long)]
        shared_width: Option<usize>,
    },
    /// Time image/text embedding and adapter training on a device.
    Bench {
        /// Model directory or hub id; without it, a random-weight model of --preset size.
        #[arg(long)]
        model: Option<String>,
        /// Size of the random model when --model is absent: vit-b-32 (the HF config) or an
        /// open_clip architecture (ViT-B-16, ViT-L-14, ViT-L-14-336, …).
        #[arg(long, default_value = "vit-b-32")]
        preset: String,
        /// cpu, cuda or cuda:N. Default: model.device of the configuration.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// f32, bf16 or f16: float type of the frozen blocks' products (bf16/f16 for GPUs).
        /// Default: model.backbone_precision of the configuration.
        #[arg(long)]
        backbone_precision: Option<BackbonePrecision>,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 3)]
        iterations: usize,
        /// Comma-separated subset of image,text,train,ranking,matmul,linear.
        #[arg(long, default_value = "image,text,train,ranking,matmul,linear")]
        only: String,
        /// Karpathy dataset whose captions are used as text inputs.
        #[arg(long)]
        captions: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() {
    rsitrd::model::device::tune_cpu_allocator();
    init_tracing();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    if let Err(error) = run(cli, &matches) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RSITRD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        builder.init();
    } else {
        builder.json().init();
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<()> {
    let config_path = cli.config.clone();
    let config = Config::from_process(cli.config.as_deref())?;
    let model_of = |model: Option<String>| model.unwrap_or_else(|| config.model.dir.clone());
    let device_of = |device: Option<DeviceChoice>| device.unwrap_or(config.model.device);
    let precision_of =
        |precision: Option<BackbonePrecision>| precision.unwrap_or(config.model.backbone_precision);
    let pixels_of = |max: Option<u64>| max.unwrap_or(config.model.max_pixels);
    match cli.command {
        Command::Params {
            model,
            arch,
            bottleneck,
            shared_width,
            json,
        } => {
            let config = match arch {
                Some(name) => rsitrd::model::openclip::named(&name)
                    .with_context(|| {
                        format!(
                            "unknown architecture {name} (known: {})",
                            rsitrd::model::openclip::ARCHITECTURES.join(", ")
                        )
                    })?
                    .to_clip_config()?,
                None => ClipConfig::from_model_dir(&hub::resolve_model_files(
                    &model_of(model),
                    &["config.json"],
                )?)?,
            };
            params(&config, bottleneck, shared_width, json)
        }
        Command::Embed {
            model,
            adapter,
            device,
            images,
            texts,
            json: _,
            max_pixels,
        } => {
            let sub = matches.subcommand_matches("embed").expect("embed matches");
            let order = input_order(sub, images.len(), texts.len());
            let model = hub::resolve_model(&model_of(model))?;
            let adapter = adapter.or_else(|| config.model.adapter.clone());
            let job = rsitrd::embed::EmbedJob {
                model: &model,
                adapter: adapter.as_deref(),
                images: &images,
                texts: &texts,
                order: &order,
                max_pixels: pixels_of(max_pixels),
                batch_size: config.model.embed_batch_size,
                precision: config.model.backbone_precision,
            };
            with_backend!(device_of(device), B, device => rsitrd::embed::embed_lines::<B>(&device, &job, &mut std::io::stdout().lock()))
        }
        Command::Train {
            model,
            dataset,
            images,
            out,
            adapter,
            device,
            backbone_precision,
            epochs,
            batch_size,
            lr,
            lr_decay,
            lr_decay_every,
            val_fraction,
            protocol,
            seed,
            loss,
            bottleneck,
            shared_width,
            resume,
            max_pixels,
        } => {
            let model = hub::resolve_model(&model_of(model))?;
            let device = device_of(device);
            let max_pixels = pixels_of(max_pixels);
            let clip = ClipConfig::from_model_dir(&model)?;
            let base = match &adapter {
                Some(path) => rsitrd::model::weights::read_adapter_meta(path)?.adapter,
                None => AdapterConfig::default_for(&clip),
            };
            let adapter_config = with_overrides(base, bottleneck, shared_width, &clip)?;
            if batch_size < 2 || epochs == 0 || !(0.0..1.0).contains(&val_fraction) || lr <= 0.0 {
                bail!(
                    "invalid training options: need --batch-size >= 2, --epochs >= 1, 0 <= --val-fraction < 1, --lr > 0"
                );
            }
            let config = TrainConfig {
                model,
                dataset,
                images,
                out,
                adapter,
                adapter_config,
                device: device.to_string(),
                backbone_precision: precision_of(backbone_precision),
                epochs,
                batch_size,
                lr,
                lr_decay,
                lr_decay_every,
                val_fraction,
                protocol,
                seed,
                loss,
                max_pixels,
            };
            let interrupt = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, interrupt.clone())?;
            }
            let outcome = with_backend!(device, B, device => {
                offline::train::<Autodiff<B>>(&config, resume, &device, interrupt.clone()).map_err(anyhow::Error::from)
            })?;
            match outcome {
                offline::Outcome::Finished {
                    best_mr,
                    best_epoch,
                } => {
                    println!(
                        "{}",
                        serde_json::json!({"status": "finished", "best_val_mr": best_mr, "best_epoch": best_epoch,
                        "best": config.out.join("best.safetensors"), "last": config.out.join("last.safetensors")})
                    );
                    Ok(())
                }
                offline::Outcome::Interrupted { global_step } => {
                    println!(
                        "{}",
                        serde_json::json!({"status": "interrupted", "step": global_step})
                    );
                    std::process::exit(130);
                }
            }
        }
        Command::Eval {
            model,
            adapter,
            dataset,
            images,
            split,
            device,
            json,
            max_pixels,
        } => {
            let split = Split::parse(&split).ok_or_else(|| {
                anyhow::anyhow!("unknown split `{split}` (expected train, val or test)")
            })?;
            let model = hub::resolve_model(&model_of(model))?;
            let adapter = adapter.or_else(|| config.model.adapter.clone());
            let dataset = Dataset::load(&dataset, &images)?;
            let max_pixels = pixels_of(max_pixels);
            if dataset.split(split).is_empty() {
                bail!("the dataset has no `{split}` images");
            }
            let precision = config.model.backbone_precision;
            with_backend!(device_of(device), B, device => {
                let embedder = Embedder::<B>::load(&model, adapter.as_deref(), precision, &device)?;
                eval_command::<B>(&embedder, &dataset, split, json, max_pixels)
            })
        }
        Command::Run => {
            let model = hub::resolve_model(&config.model.dir)?;
            let metrics = rsitrd::daemon::metrics_recorder();
            with_backend!(config.model.device, B, device => run_daemon::<B>(config.clone(), model, device, metrics, false))
        }
        Command::Serve => {
            if config.index.backend != rsitrd::config::IndexBackendKind::Remote {
                bail!("`rsitrd serve` follows a Qdrant server: set [index] backend = \"remote\"");
            }
            let model = hub::resolve_model(&config.model.dir)?;
            let metrics = rsitrd::daemon::metrics_recorder();
            with_backend!(config.model.device, B, device => run_daemon::<B>(config.clone(), model, device, metrics, true))
        }
        Command::Rollback { to } => rollback_command(&config, to),
        Command::FillStore { samples, batch } => {
            let store = open_store(&config)?;
            let started = std::time::Instant::now();
            rsitrd::bench::fill_store(&store, samples, batch)?;
            println!(
                "{}",
                serde_json::json!({"samples": samples, "seconds": started.elapsed().as_secs_f64()})
            );
            Ok(())
        }
        Command::RandomModel { like, out, seed } => {
            rsitrd::model::weights::write_random_model(&like, &out, seed)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Ingest => ingest_command(&config),
        Command::Publish { dataset, images } => publish_command(&config, &dataset, &images),
        Command::Import { dataset, images } => import_command(&config, &dataset, &images),
        Command::Stats { json } => stats_command(&config, json),
        Command::Quarantine {
            release,
            release_all,
            json,
        } => quarantine_command(&config, &release, release_all, json),
        Command::BenchIngest {
            dataset,
            images,
            messages,
            latency_rate,
            latency_messages,
        } => {
            let dataset = load_dataset(&dataset, &images)?;
            std::fs::create_dir_all(&config.store.dir)?;
            let report = rsitrd::ingest::bench::run_ingest_bench(
                &config.amqp,
                Arc::new(rsitrd::ingest::Validator::from_config(&config)),
                &dataset,
                messages,
                latency_rate,
                latency_messages,
                &config.store.dir,
            )?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::StreamEval {
            model,
            dataset,
            images,
            tasks,
            order,
            seeds,
            variant,
            no_bounds,
            eval_split,
            device,
            out,
            bottleneck,
            shared_width,
        } => {
            let job = StreamJob {
                model: hub::resolve_model(&model_of(model))?,
                datasets: dataset,
                images,
                tasks,
                orders: order,
                seeds,
                variants: variant,
                bounds: !no_bounds,
                eval_split,
                out,
                adapter_shape: (bottleneck, shared_width),
            };
            let device = device_of(device);
            stream_eval_command(config_path.as_deref(), config.clone(), job, device)
        }
        Command::Bench {
            model,
            preset,
            device,
            backbone_precision,
            batch_size,
            iterations,
            only,
            captions,
            seed,
        } => {
            let parts: Vec<&str> = only.split(',').map(str::trim).collect();
            for part in &parts {
                if !["image", "text", "train", "ranking", "matmul", "linear"].contains(part) {
                    bail!(
                        "--only: unknown part `{part}` (expected image, text, train, ranking, matmul or linear)"
                    );
                }
            }
            let captions = match captions {
                Some(path) => Dataset::captions(&path)?,
                None => Vec::new(),
            };
            let options = bench::BenchOptions {
                batch_size,
                iterations,
                image: parts.contains(&"image"),
                text: parts.contains(&"text"),
                train: parts.contains(&"train"),
                ranking: parts.contains(&"ranking"),
                matmul: parts.contains(&"matmul"),
                linear: parts.contains(&"linear"),
                captions,
                seed,
                precision: precision_of(backbone_precision),
            };
            let model = model.map(|spec| hub::resolve_model(&spec)).transpose()?;
            with_backend!(device_of(device), B, device => bench_command::<B>(&device, model.as_deref(), &preset, &options))
        }
    }
}

fn open_store(config: &Config) -> Result<rsitrd::store::Store> {
    let dir = config.store.store_dir();
    rsitrd::store::Store::open_configured(&config.store)
        .with_context(|| format!("cannot open the store in {}", dir.display()))
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Cancels `cancel` on the first SIGINT or SIGTERM.
fn cancel_on_signals(cancel: tokio_util::sync::CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        }
        cancel.cancel();
    });
    Ok(())
}

fn run_daemon<B: ModelBackend>(
    config: Config,
    model: PathBuf,
    device: B::Device,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    replica: bool,
) -> Result<()>
where
    B::Device: Send + Sync,
{
    tokio_runtime()?.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel_on_signals(cancel.clone())?;
        if replica {
            rsitrd::replica::run::<B>(config, model, device, cancel, metrics).await?;
        } else {
            rsitrd::daemon::run::<B>(config, model, device, cancel, metrics).await?;
        }
        tracing::info!("stopped");
        Ok(())
    })
}

fn rollback_command(config: &Config, to: Option<u64>) -> Result<()> {
    println!("{}", rsitrd::client::rollback(config, to)?);
    Ok(())
}

fn ingest_command(config: &Config) -> Result<()> {
    tokio_runtime()?.block_on(async {
        // Signals first: a SIGTERM while the store opens (repairing after a crash can take a
        // while) must stop the process cleanly, not kill it.
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel_on_signals(cancel.clone())?;
        let store = Arc::new(open_store(config)?);
        rsitrd::ingest::run(config, store, cancel).await?;
        tracing::info!("ingestion stopped");
        Ok(())
    })
}

/// `rsitrd stream-eval`'s arguments.
struct StreamJob {
    model: PathBuf,
    datasets: Vec<PathBuf>,
    images: Vec<PathBuf>,
    tasks: rsitrd::streameval::TaskSplit,
    orders: Vec<String>,
    seeds: Vec<u64>,
    variants: Vec<String>,
    bounds: bool,
    eval_split: rsitrd::streameval::EvalSplit,
    out: PathBuf,
    /// `--bottleneck`, `--shared-width`.
    adapter_shape: (Option<usize>, Option<usize>),
}

fn stream_eval_command(
    config_path: Option<&Path>,
    config: Config,
    job: StreamJob,
    device: DeviceChoice,
) -> Result<()> {
    use rsitrd::streameval::{self, Plan, Variant};
    if job.datasets.len() != job.images.len() {
        bail!("give one --images per --dataset");
    }
    if job.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    let mut datasets = Vec::new();
    for (path, images) in job.datasets.iter().zip(&job.images) {
        // The file's stem names it, or its folder's when the file is a generic dataset.json.
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_string());
        let name = match stem.as_deref() {
            Some("dataset") | None => path
                .parent()
                .and_then(|p| p.file_name())
                .map_or_else(|| "dataset".into(), |n| n.to_string_lossy().to_string()),
            Some(stem) => stem.to_string(),
        };
        datasets.push((name, load_dataset(path, images)?));
    }
    let tasks = streameval::make_tasks(&datasets, &job.tasks, job.eval_split)?;
    let orders = if job.orders.is_empty() {
        vec![(0..tasks.len()).collect()]
    } else {
        job.orders
            .iter()
            .map(|spec| streameval::parse_order(spec, &tasks))
            .collect::<Result<_, _>>()?
    };
    let mut variants = vec![Variant {
        name: "configured".into(),
        overrides: Vec::new(),
        config,
    }];
    let mut specs: Vec<(String, Vec<(String, String)>)> = job
        .variants
        .iter()
        .map(|spec| streameval::parse_variant(spec))
        .collect::<Result<_, _>>()?;
    if job.bounds {
        let naive = streameval::NAIVE
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        specs.push(("naive".into(), naive));
    }
    for (name, overrides) in specs {
        if variants.iter().any(|v| v.name == name)
            || ["zero-shot", "joint"].contains(&name.as_str())
        {
            bail!("variant name {name} is used twice or reserved");
        }
        let env = std::env::vars().chain(streameval::as_env(&overrides));
        let config = Config::load(config_path, env).with_context(|| format!("variant {name}"))?;
        variants.push(Variant {
            name,
            overrides,
            config,
        });
    }
    std::fs::create_dir_all(&job.out)?;
    if job.adapter_shape != (None, None) {
        if variants.iter().any(|v| v.config.model.adapter.is_some()) {
            bail!(
                "--bottleneck/--shared-width start from an untrained adapter: unset model.adapter"
            );
        }
        let clip = ClipConfig::from_model_dir(&job.model)?;
        let (bottleneck, shared_width) = job.adapter_shape;
        let shape = with_overrides(
            AdapterConfig::default_for(&clip),
            bottleneck,
            shared_width,
            &clip,
        )?;
        let path = job.out.join("start-adapter.safetensors");
        with_backend!(device, B, device => {
            streameval::write_start_adapter::<B>(&job.model, &shape, &path, &device)
                .map_err(anyhow::Error::from)
        })?;
        for variant in &mut variants {
            variant.config.model.adapter = Some(path.clone());
        }
    }
    let plan = Plan {
        model_dir: job.model,
        tasks,
        orders,
        seeds: job.seeds,
        variants,
        joint: job.bounds,
        eval_split: job.eval_split,
        work_dir: job.out.join("work"),
    };
    let report = with_backend!(device, B, device => {
        streameval::run::<B>(&plan, &device, |run| {
            eprintln!(
                "{} seed {} order {}: final mR {:.2} ({:.1} s)",
                run.variant,
                run.seed,
                run.order.join(">"),
                run.average_final,
                run.compute.seconds
            );
        })
        .map_err(anyhow::Error::from)
    })?;
    let _ = std::fs::remove_dir_all(&plan.work_dir);
    let json = job.out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let svg = job.out.join("report.svg");
    std::fs::write(&svg, report.svg())?;
    print!("{}", report.table());
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn load_dataset(dataset: &Path, images: &Path) -> Result<Dataset> {
    Dataset::load(dataset, images).map_err(|report| anyhow::anyhow!("{report}"))
}

fn publish_command(config: &Config, dataset: &Path, images: &Path) -> Result<()> {
    let dataset = Arc::new(load_dataset(dataset, images)?);
    let total = dataset.images.len();
    let bar = progress_bar(total as u64, "publishing");
    let published = tokio_runtime()?.block_on(rsitrd::ingest::amqp::publish_all(
        &config.amqp,
        rsitrd::ingest::import::dataset_messages(dataset),
        || bar.inc(1),
    ))?;
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({"published": published, "queue": config.amqp.queue})
    );
    Ok(())
}

fn import_command(config: &Config, dataset: &Path, images: &Path) -> Result<()> {
    let dataset = load_dataset(dataset, images)?;
    let store = open_store(config)?;
    let validator = rsitrd::ingest::Validator::from_config(config);
    let bar = progress_bar(dataset.images.len() as u64, "importing");
    let summary = rsitrd::ingest::import::import_dataset(&store, &validator, &dataset, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn stats_command(config: &Config, json: bool) -> Result<()> {
    let dir = config.store.store_dir();
    let reader = rsitrd::store::StoreReader::open(&dir)
        .with_context(|| format!("cannot read the store in {}", dir.display()))?;
    let stats = reader.stats()?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
    } else if let serde_json::Value::Object(map) = serde_json::to_value(&stats)? {
        for (key, value) in map {
            println!("{key}: {value}");
        }
    }
    Ok(())
}

fn quarantine_command(config: &Config, release: &[String], all: bool, json: bool) -> Result<()> {
    if release.is_empty() && !all {
        let dir = config.store.store_dir();
        let reader = rsitrd::store::StoreReader::open(&dir)
            .with_context(|| format!("cannot read the store in {}", dir.display()))?;
        let records = reader.quarantined()?;
        if json {
            println!("{}", serde_json::json!({ "quarantined": records }));
        } else {
            for record in records {
                println!("{}\t{}\t{}", record.id, record.stage, record.reason);
            }
        }
        return Ok(());
    }
    let ids: Vec<rsitrd::store::SampleId> = release
        .iter()
        .map(|hex| {
            rsitrd::store::SampleId::parse(hex)
                .with_context(|| format!("`{hex}` is not a sample id (64 hex digits)"))
        })
        .collect::<Result<_>>()?;
    let released = rsitrd::client::release(config, if all { None } else { Some(&ids) })?;
    println!("{released}");
    Ok(())
}

/// A progress bar on a terminal, a hidden one otherwise (logs stay clean).
fn progress_bar(length: u64, message: &'static str) -> indicatif::ProgressBar {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(length);
        bar.set_message(message);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}

fn params(
    config: &ClipConfig,
    bottleneck: Option<usize>,
    shared_width: Option<usize>,
    json: bool,
) -> Result<()> {
    let config = config.clone();
    let adapter = with_overrides(
        AdapterConfig::default_for(&config),
        bottleneck,
        shared_width,
        &config,
    )?;
    let backbone = backbone_params(&config);
    let trainable = adapter.trainable_params(&config);
    let total = backbone + trainable;
    let percent = 100.0 * trainable as f64 / backbone as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({"total": total, "backbone": backbone, "trainable": trainable,
                "trainable_percent_of_backbone": percent})
        );
    } else {
        println!("total      {total}");
        println!("backbone   {backbone} (frozen)");
        println!("trainable  {trainable} ({percent:.3} % of the backbone)");
    }
    Ok(())
}

/// Applies `--bottleneck` / `--shared-width` and checks the adapter fits the backbone.
fn with_overrides(
    mut adapter: AdapterConfig,
    bottleneck: Option<usize>,
    shared_width: Option<usize>,
    clip: &ClipConfig,
) -> Result<AdapterConfig> {
    if let Some(width) = bottleneck {
        adapter.bottleneck = width;
    }
    if let Some(width) = shared_width {
        adapter.shared_width = width;
    }
    adapter.validate_for(clip)?;
    Ok(adapter)
}

/// Positions of `--image` and `--text` values on the command line, merged.
fn input_order(matches: &ArgMatches, images: usize, texts: usize) -> Vec<(bool, usize)> {
    let mut order: Vec<(usize, bool, usize)> = Vec::with_capacity(images + texts);
    if let Some(indices) = matches.indices_of("images") {
        order.extend(indices.enumerate().map(|(i, at)| (at, true, i)));
    }
    if let Some(indices) = matches.indices_of("texts") {
        order.extend(indices.enumerate().map(|(i, at)| (at, false, i)));
    }
    order.sort();
    order
        .into_iter()
        .map(|(_, is_image, i)| (is_image, i))
        .collect()
}

fn eval_command<B: ModelBackend>(
    embedder: &Embedder<B>,
    dataset: &Dataset,
    split: Split,
    json: bool,
    max_pixels: u64,
) -> Result<()> {
    let images = dataset.split(split);
    let metrics = rsitrd::eval::evaluate(embedder, dataset, &images, max_pixels)?;
    if json {
        println!("{}", serde_json::to_string(&metrics)?);
    } else {
        println!(
            "{split} split: {} images, {} captions (adapter version {})",
            metrics.images,
            metrics.captions,
            embedder.adapter_version()
        );
        println!("            R@1     R@5     R@10");
        println!(
            "image→text  {:>6.2}  {:>6.2}  {:>6.2}",
            metrics.i2t_r1, metrics.i2t_r5, metrics.i2t_r10
        );
        println!(
            "text→image  {:>6.2}  {:>6.2}  {:>6.2}",
            metrics.t2i_r1, metrics.t2i_r5, metrics.t2i_r10
        );
        println!("mR          {:>6.2}", metrics.mr);
    }
    Ok(())
}

fn bench_command<B: ModelBackend>(
    device: &B::Device,
    model_dir: Option<&Path>,
    preset: &str,
    options: &bench::BenchOptions,
) -> Result<()> {
    type AB<B> = Autodiff<B>;
    let (model, config, adapter, description) = match model_dir {
        Some(dir) => {
            let config = ClipConfig::from_model_dir(dir)?;
            let adapter = AdapterConfig::default_for(&config);
            let loaded = rsitrd::model::weights::load_clip::<AB<B>>(dir, &adapter, device)?;
            (loaded.model, config, adapter, dir.display().to_string())
        }
        None => {
            let config = match preset {
                "vit-b-32" => ClipConfig::vit_base_patch32(),
                other => rsitrd::model::openclip::named(other)
                    .with_context(|| {
                        format!(
                            "unknown preset `{other}` (expected vit-b-32 or an open_clip \
                             architecture: {})",
                            rsitrd::model::openclip::ARCHITECTURES.join(", ")
                        )
                    })?
                    .to_clip_config()?,
            };
            let adapter = AdapterConfig::default_for(&config);
            let model = config.init::<AB<B>>(&adapter, device);
            (model, config, adapter, format!("{preset} (random weights)"))
        }
    };
    let report = bench::run::<AB<B>>(model, &config, &adapter, device, options, description)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
