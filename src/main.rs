//! `selfsup`: the command line. Thin: parse, load the config, call the pipeline.

mod bench;
mod info;
mod presets;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use selfsup_pipeline::finetune::{self, FinetuneOptions};
use selfsup_pipeline::output::{self, Output};
use selfsup_pipeline::runlock::RunLock;
use selfsup_pipeline::tensorboard::{NullSink, TensorBoard};
use selfsup_pipeline::trainer::{self, RunOptions};
use selfsup_pipeline::transfer::{self, EvalContext};
use selfsup_pipeline::{checkpoint, out, say, Config};

include!(concat!(env!("OUT_DIR"), "/presets.rs"));

#[derive(Parser)]
#[command(name = "selfsup", version, about = "Self-supervised pretraining for images (LibTorch inside)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a backbone, checkpoint it, and evaluate it by k-NN and linear probe.
    Pretrain {
        /// A TOML file or a built-in preset name. Default: `simclr-fmnist` when CUDA is visible, else
        /// `simclr-fmnist-tiny`.
        #[arg(long)]
        config: Option<String>,
        /// Override a config key, e.g. `--set train.epochs=5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run folder (default: runs/<name>-<UTC time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its latest checkpoint (from the next batch, exactly as if never stopped),
        /// with the run's own config (plus --set).
        /// With --config too: start the run from it when --out holds none yet (one command line for a job's first
        /// start and its requeues). A run with no checkpoint yet starts again from step 0.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Replace the run already in --out (its checkpoints, event files, summaries); without it, pretraining
        /// into a folder that holds a run is refused.
        #[arg(long, requires = "out", conflicts_with = "resume")]
        overwrite: bool,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// Train with N processes on this machine (one per GPU; on the CPU, each takes its share of the cores):
        /// starts N ranks of this command, forwards signals to them and stops them all if one fails.
        /// `train.batch_size` stays the global batch. (Under torchrun or srun, leave it out: they start the ranks.)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
        nproc_per_node: Option<u32>,
        /// Start the backbone from a public model's weights instead of random ones: a safetensors file with
        /// torchvision ResNet names (`conv1.weight`, `layer1.0.bn1.running_mean`) or timm ViT names (`cls_token`,
        /// `pos_embed`, `blocks.0.attn.qkv.weight`), or a `selfsup export`. Classifier (`fc.*`, `head.*`) and
        /// `num_batches_tracked` are left out; a ViT's position table is resampled to the config's grid and an RGB
        /// stem summed for 1-channel data, as timm does; anything else that does not fit is an error listing it.
        /// Heads (projector, predictor, decoder) start as usual; a momentum teacher starts as the backbone.
        /// With --resume: used only when the run starts (no run in --out yet); a run with checkpoints continues
        /// from them.
        #[arg(long, value_name = "W.safetensors")]
        init_from: Option<PathBuf>,
    },
    /// Evaluate a checkpoint: k-NN and linear probe on its data's labeled train/test split.
    Eval {
        /// A checkpoint folder, a run folder or its checkpoints folder (the latest is used).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Override keys of the checkpoint's config (e.g. `eval.probe_epochs=50`, `data.test=...`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Where to write eval.json (default: the run folder of the checkpoint).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Evaluate the momentum teacher's backbone (BYOL, MoCo v3, DINO) instead of the student's.
        #[arg(long)]
        teacher: bool,
        /// Replace an eval.json (and projector files) already in the output folder.
        #[arg(long)]
        overwrite: bool,
    },
    /// Fine-tune a pretrained backbone (or the same one from scratch) on labeled data and report top-1,
    /// per-class and worst-class accuracy. The recipe is the checkpoint's `[finetune]` section (plus --set); or
    /// fine-tune a public torchvision / timm backbone with --init-from W.safetensors --config C.
    Finetune(FinetuneArgs),
    /// Write a checkpoint's backbone alone, under torchvision (ResNet) or timm (ViT) names, for PyTorch.
    Export {
        /// A checkpoint folder, a run folder or its checkpoints folder (the latest is used).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Export the momentum teacher's backbone (BYOL, MoCo v3, DINO: what their authors publish).
        #[arg(long)]
        teacher: bool,
        /// Replace --out if it exists (never a checkpoint's own files).
        #[arg(long)]
        overwrite: bool,
    },
    /// Versions, devices, threads, and which datasets are installed where.
    Info,
    /// Every built-in preset (usable as `--config NAME`) with a one-line description.
    Presets,
    /// Print a shell completion script, e.g. `selfsup completions bash > /etc/bash_completion.d/selfsup`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// What a dataset holds: counts, image sizes, unreadable files, exact duplicates, class balance.
    Inspect {
        /// An IDX file, a CIFAR batch or folder, or a folder of images.
        data: PathBuf,
        /// Channels to decode image folders to (1 or 3).
        #[arg(long, default_value_t = 3)]
        channels: u8,
        /// Where to write the JSON report (default: <data name>.inspect.json in the current folder).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Replace the JSON report if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Measure the data stage alone: pairs (samples with all their views) per second.
    BenchLoader {
        /// A TOML file or a built-in preset name (`selfsup presets`): its data and views are measured.
        #[arg(long)]
        config: String,
        /// Override a config key, e.g. `--set train.batch_size=256` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// How long to measure, after a short warm-up.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Loader threads (default: the config's train.threads; 0 = all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// A GPU's training rate in samples/s: say whether it would wait for this loader, and how many
        /// threads it would take not to.
        #[arg(long)]
        gpu_img_per_s: Option<f64>,
    },
    /// Pack a source (IDX file, CIFAR batches, image folder) into one chunked, compressed, checksummed HDF5 file.
    Pack {
        /// What to pack: anything `data.train` accepts.
        src: PathBuf,
        /// The HDF5 file to write (`.h5` or `.hdf5`); written to a temporary file, then renamed.
        out: PathBuf,
        /// Channels to decode image folders to (1 or 3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        channels: u8,
        /// Store the image files' bytes instead of decoded pixels (image folders; automatic when sizes differ).
        #[arg(long)]
        encoded: bool,
        /// Write the samples in a random order from this seed (for folders sorted by class).
        #[arg(long, value_name = "SEED")]
        shuffle: Option<u64>,
        /// Chunk compression: lz4hc (Blosc LZ4HC, HDF5 filter 32001: nearly deflate's ratio, ~8x faster to read;
        /// h5py reads it after `import hdf5plugin`), deflate (gzip: every HDF5 tool reads it), none.
        #[arg(long, value_enum, default_value_t = CodecArg::Lz4hc)]
        codec: CodecArg,
        /// Compression level: lz4hc 1-9 (default 9), deflate 0-9 (default 4; 0 = stored).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        level: Option<u8>,
        /// Shorthand for `--codec deflate --level N` (0-9).
        #[arg(long, value_name = "N", conflicts_with_all = ["codec", "level"], value_parser = clap::value_parser!(u8).range(0..=9))]
        deflate: Option<u8>,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Loads `spec` as a file if it exists, else as a built-in preset.
pub fn load_config(spec: &str, overrides: &[String]) -> Result<Config> {
    let path = Path::new(spec);
    // A name that is there in any form (a link that loops or dangles too) is a file, and its error is its own.
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(Config::load(path, overrides)?);
    }
    match PRESETS.iter().find(|(name, _)| *name == spec) {
        Some((name, text)) => Ok(Config::from_toml(text, &format!("preset {name}"), overrides)?),
        None => {
            let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
            bail!("--config {spec}: no such file, and not a preset (presets: {})", names.join(", "))
        }
    }
}

/// `YYYYmmdd-HHMMSS` in UTC, for default run folder names.
fn utc_stamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}{:02}{:02}-{:02}{:02}{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

/// What a run folder holds that `pretrain --overwrite` replaces (and whose presence means "a run is here").
const RUN_FILES: [&str; 9] = [
    "config.toml",
    "init_from.json",
    "checkpoints",
    "summary.json",
    "eval.json",
    "projector",
    "projector_config.pbtxt",
    "finetune",
    "finetune.json",
];

/// What a `pretrain` command line means for its run folder.
struct Plan {
    cfg: Config,
    /// Continue from the folder's latest checkpoint.
    resume: bool,
    /// `--resume` of a run that died before its first checkpoint (a job preempted early and requeued): it starts
    /// again from step 0 with its own config.toml (and its recorded `--init-from` weights), beside what it left.
    restart: bool,
    init_from: Option<PathBuf>,
}

/// `--resume --out R` continues the run in R; with `--config C` too, a folder without a run yet is started with C
/// (one command line for a job's first start and its requeues); a run there with no checkpoint yet starts again
/// from step 0 with its own config. Without `--resume`, `--config` (or the default preset) as given.
/// `say`: what it decided goes to stderr (rank 0 only: the other ranks say nothing unless they fail).
fn plan_run(
    config: Option<String>,
    set: &[String],
    out: Option<&Path>,
    resume: bool,
    init_from: Option<PathBuf>,
    say: bool,
) -> Result<Plan> {
    macro_rules! tell {
        ($($arg:tt)*) => { if say { say!($($arg)*) } };
    }
    let fresh = |config: Option<String>, init_from| -> Result<Plan> {
        let cfg = load_config(&config.unwrap_or_else(default_preset), set)?;
        Ok(Plan { cfg, resume: false, restart: false, init_from })
    };
    if !resume {
        return fresh(config, init_from);
    }
    let out = out.expect("clap requires --out with --resume");
    let file = out.join("config.toml");
    let ckpts = out.join("checkpoints");
    let started = ckpts.join("LATEST").exists() || !checkpoint::list(&ckpts).is_empty();
    if !file.is_file() && started {
        // config.toml lost (deleted, or not copied with the checkpoints): every checkpoint holds the config it
        // was written under, and the trainer writes the run's config.toml again from it.
        let ckpt = checkpoint::resolve(out)?;
        tell!("{}: missing; the run's config is taken from {}", file.display(), ckpt.display());
        let cfg = Config::from_toml(
            &checkpoint::load_config(&ckpt)?.to_toml(),
            &ckpt.join("config.toml").display().to_string(),
            set,
        )?;
        return Ok(Plan { cfg, resume: true, restart: false, init_from: None });
    }
    if !file.is_file() {
        if config.is_some() {
            tell!("--resume --out {}: no run there yet; starting it with --config", out.display());
            return fresh(config, init_from);
        }
        bail!(
            "--resume --out {}: no run to resume there (no config.toml); start one with `selfsup pretrain --out {}` \
             (or give --config too: --resume then starts the run when there is none yet)",
            out.display(),
            out.display()
        );
    }
    let cfg = Config::load(&file, set)?;
    if let Some(c) = &config {
        let given = load_config(c, set)?;
        let differ: Vec<String> = given.changes_from(&cfg).iter().map(|c| c.key.clone()).collect();
        if !differ.is_empty() {
            tell!(
                "note: --config {c} differs from the run's own config.toml in {}; the run's own is used (--set \
                 changes it)",
                differ.join(", ")
            );
        }
    }
    if started {
        tell!("resuming run {} ({}, with its own config.toml)", out.display(), cfg.name);
        if let Some(w) = &init_from {
            tell!("note: --init-from {} is for a run's start: this one continues from its checkpoint", w.display());
        }
        return Ok(Plan { cfg, resume: true, restart: false, init_from: None });
    }
    // Died before its first checkpoint: nothing to continue from; the same run again from step 0.
    let record = out.join(trainer::INIT_FROM);
    let init_from = match std::fs::read(&record) {
        _ if init_from.is_some() => init_from,
        Ok(bytes) => {
            let i: selfsup_pipeline::pretrained::Imported =
                serde_json::from_slice(&bytes).with_context(|| format!("{}: not readable", record.display()))?;
            let now = checkpoint::sha256_file(&i.file)
                .with_context(|| format!("{}: the weights it names", record.display()))?;
            if now != i.sha256 {
                bail!(
                    "{}: {} changed since the run started (sha256 {} then, {now} now)",
                    record.display(),
                    i.file.display(),
                    i.sha256
                );
            }
            Some(i.file)
        }
        Err(_) => None,
    };
    tell!(
        "--resume --out {}: the run has no checkpoint yet (it stopped before its first one): starting it again from \
         step 0 with its own config.toml{}",
        out.display(),
        if init_from.is_some() { " and its --init-from weights" } else { "" }
    );
    Ok(Plan { cfg, resume: false, restart: true, init_from })
}

/// The run artifacts in `dir`: the fixed names above, the event files and the configs a `--resume` with a
/// changed recipe kept.
fn run_artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = RUN_FILES.iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("events.out.tfevents.")
            || (name.starts_with("config-before-step-") && name.ends_with(".toml"))
        {
            found.push(entry.path());
        }
    }
    found
}

/// Exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal
/// killed, when a signal stopped the run.
fn exit_if_interrupted() {
    if let Some(sig) = selfsup_pipeline::signals::stop_requested() {
        std::process::exit(128 + sig);
    }
}

/// `selfsup pretrain --nproc-per-node N ...`: this command's arguments, less `--nproc-per-node`, run as N ranks
/// (with `--out` resolved here when it is not given, so that every rank names the same folder); exits with the
/// launcher's code.
fn launch_ranks(nproc: usize, out: Option<PathBuf>) -> Result<()> {
    if std::env::var_os("RANK").is_some()
        || std::env::var_os("SLURM_PROCID")
            .is_some_and(|_| std::env::var("SLURM_NTASKS").ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(1) > 1)
    {
        bail!("--nproc-per-node inside a launched rank (RANK or SLURM_PROCID is set): torchrun or srun already started the ranks; leave --nproc-per-node out");
    }
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc-per-node" {
            it.next();
        } else if !a.to_string_lossy().starts_with("--nproc-per-node=") {
            args.push(a);
        }
    }
    if out.is_none() {
        let cfg_name = args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| args.get(i + 1))
            .map(|c| c.to_string_lossy().into_owned());
        let name = match cfg_name {
            Some(spec) => load_config(&spec, &[])?.name,
            None => "run".into(),
        };
        let dir = PathBuf::from("runs").join(format!("{name}-{}", utc_stamp()));
        args.push("--out".into());
        args.push(dir.into_os_string());
    }
    let code = selfsup_pipeline::launch::launch_local(nproc, &args, std::time::Duration::from_secs(30))?;
    std::process::exit(code);
}

fn pretrain(
    config: Option<String>,
    set: Vec<String>,
    out: Option<PathBuf>,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    init_from: Option<PathBuf>,
) -> Result<()> {
    // From the first instruction: a SIGTERM or SIGUSR1 (SLURM's) during the setup, which can take minutes on a
    // large folder, must not kill the process with the default action, nor be forgotten. A stop asked for
    // before the first step ends the command with nothing written.
    selfsup_pipeline::signals::install().context("installing the signal handlers")?;
    let launch = selfsup_pipeline::launch::Launch::from_env()?;
    if launch.world > 1 && out.is_none() {
        bail!(
            "--out is required with more than one process ({}: {} ranks): every rank must name the same run folder",
            launch.by,
            launch.world
        );
    }
    if !launch.is_main() {
        return pretrain_rank(config, set, out.expect("checked above"), resume, launch, init_from);
    }
    let plan = plan_run(config, &set, out.as_deref(), resume, init_from, true)?;
    let (cfg, resume, init_from) = (plan.cfg, plan.resume, plan.init_from);
    if let Some(file) = &init_from {
        // Before the run folder is touched: a file that does not fit leaves nothing to --overwrite.
        selfsup_pipeline::pretrained::check_backbone_file(file, &cfg).context("--init-from")?;
    }
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-{}", cfg.name, utc_stamp())));
    // Not into the data (its files would become part of it) nor into a checkpoint.
    output::check(Output::Folder { dir: &out, files: &[] }, &cfg.inputs(), true, "--out")?;
    let what = if resume { "selfsup pretrain --resume" } else { "selfsup pretrain" };
    let created = !out.exists();
    let _lock = RunLock::acquire(&out, what)?;
    let existing = run_artifacts(&out);
    if !resume && !plan.restart && !existing.is_empty() {
        if !overwrite {
            bail!(
                "{} already holds a run ({}): --resume continues it, --overwrite replaces it, or choose another --out",
                out.display(),
                existing.iter().map(|p| p.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", ")
            );
        }
        for p in &existing {
            let removed = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
            removed.with_context(|| format!("--overwrite: removing {}", p.display()))?;
        }
        say!("--overwrite: removed the previous run in {}", out.display());
    }
    // Before anything is written (an event file): a finished run, or one resumed under a config its checkpoint
    // cannot continue under, stays exactly as it is.
    let resumed = if resume {
        let ckpt = checkpoint::resolve(&out)?;
        let (recipe, bookkeeping) = trainer::resume_changes(&cfg, &ckpt)?;
        let state = checkpoint::load_state(&ckpt)?;
        if let Some(done) = trainer::nothing_to_do(&cfg, &out, &state, None) {
            say!("{done}");
            return Ok(());
        }
        if !bookkeeping.is_empty() {
            let keys: Vec<String> = bookkeeping.iter().map(ToString::to_string).collect();
            say!("resume with {}", keys.join(", "));
        }
        Some((ckpt, state.step, recipe))
    } else {
        None
    };
    let (launched, world, by) = (launch.launched(), launch.world, launch.by);
    let opts = RunOptions { out: out.clone(), resume, quiet, launch, init_from };
    // Everything that can be checked is, before the run folder is written.
    // A folder this command made for a run that never started goes again (it holds only the lock).
    let unmake = || {
        if created {
            let _ = std::fs::remove_file(out.join(".lock"));
            let _ = std::fs::remove_dir(&out);
        }
    };
    let run = match trainer::prepare(&cfg, &opts) {
        Ok(Some(run)) => run,
        Ok(None) => return Ok(()), // --resume of a finished run: nothing to do (said on stderr)
        Err(e) => {
            unmake();
            return Err(e.into());
        }
    };
    if let Some(sig) = selfsup_pipeline::signals::stop_requested() {
        say!("{}: stopped before the first step; nothing written", selfsup_pipeline::signals::name(sig));
        unmake();
        std::process::exit(128 + sig);
    }
    let mut tb = TensorBoard::create(&out).with_context(|| format!("creating the event file in {}", out.display()))?;
    if let Some((ckpt, step, recipe)) = &resumed {
        trainer::record_resume_changes(&out, ckpt, *step, recipe, &mut tb)?;
    }
    say!("run folder: {}", out.display());
    if launched {
        say!("rank 0 of {world} ({by}): global batch {}", cfg.train.batch_size);
    }
    let summary = run.run(&mut tb)?;
    selfsup_pipeline::write_json_atomic(&out.join("summary.json"), &summary)?;
    if let Some(sig) = &summary.interrupted {
        let at = summary.checkpoint.as_ref().map_or("?".into(), |p| p.display().to_string());
        out!(
            "stopped by {sig} after {} steps; checkpoint {at}; continue with --resume --out {}",
            summary.steps,
            out.display()
        );
        exit_if_interrupted();
    }
    let steps = if summary.steps_this_process == summary.steps {
        format!("{} steps", summary.steps)
    } else {
        format!(
            "to step {} ({} in this process, resumed at {})",
            summary.steps,
            summary.steps_this_process,
            summary.steps - summary.steps_this_process
        )
    };
    out!(
        "pretrained {steps} ({} epochs) on {} in {:.1}s: {:.0} img/s, waited for data {:.1}% of the time, final loss {:.4}",
        summary.epochs,
        summary.device,
        summary.seconds,
        summary.images_per_s,
        100.0 * summary.data_wait_fraction,
        summary.final_loss
    );
    if let Some(profile) = &summary.profile {
        out!("{profile}");
    }
    if let (Some(std), Some(rank)) = (summary.embedding_std, summary.effective_rank) {
        out!("collapse monitor: embedding_std {std:.3}, effective_rank {rank:.2}");
    }
    if let Some(w) = &summary.collapse_warning {
        out!("WARNING: {w}");
    }
    if summary.unreadable_samples > 0 {
        out!("{} unreadable sample(s) were skipped (listed above)", summary.unreadable_samples);
    }
    if let Some(why) = &summary.eval_skipped {
        out!("no evaluation: {why}");
    }
    if let Some(report) = &summary.eval {
        out!("{report}");
        if let Some(raw) = &report.raw_pixels_linear {
            let verdict = if report.linear.top1 > raw.top1 { "beats" } else { "does NOT beat" };
            out!("linear probe {:.2}% {verdict} raw pixels {:.2}%", 100.0 * report.linear.top1, 100.0 * raw.top1);
        }
    }
    if cfg.finetune.at_end {
        run_compare(&cfg, &checkpoint::resolve(&out)?, &out.join("finetune"), quiet, false)?;
    }
    exit_if_interrupted();
    out!("run folder: {}  (tensorboard --logdir {})", out.display(), out.display());
    Ok(())
}

/// The preset `pretrain` uses without `--config` (said on stderr): the GPU recipe when CUDA is visible. Probing
/// CUDA costs a second or more: only done when the preset depends on it.
fn default_preset() -> String {
    let cuda = tch::Cuda::is_available();
    let preset = if cuda { "simclr-fmnist" } else { "simclr-fmnist-tiny" };
    let why = if cuda { "CUDA visible" } else { "no CUDA device: the CPU preset" };
    say!("no --config given: using preset {preset} ({why})");
    preset.to_string()
}

/// A rank other than 0: trains its slice of every batch and writes nothing (rank 0 holds the lock and writes the
/// checkpoints, event files and summary); says nothing unless it fails.
fn pretrain_rank(
    config: Option<String>,
    set: Vec<String>,
    out: PathBuf,
    resume: bool,
    launch: selfsup_pipeline::launch::Launch,
    init_from: Option<PathBuf>,
) -> Result<()> {
    let rank = launch.rank;
    let plan = plan_run(config, &set, Some(&out), resume, init_from, false)?;
    let (cfg, resume, init_from) = (plan.cfg, plan.resume, plan.init_from);
    if resume {
        let ckpt = checkpoint::resolve(&out)?;
        trainer::resume_changes(&cfg, &ckpt)?;
        if trainer::nothing_to_do(&cfg, &out, &checkpoint::load_state(&ckpt)?, None).is_some() {
            return Ok(());
        }
    }
    let opts = RunOptions { out, resume, quiet: true, launch, init_from };
    let summary = trainer::pretrain(&cfg, &opts, &mut NullSink).with_context(|| format!("rank {rank}"))?;
    if summary.is_some() {
        exit_if_interrupted();
    }
    Ok(())
}

fn eval(ckpt: PathBuf, mut set: Vec<String>, out: Option<PathBuf>, teacher: bool, overwrite: bool) -> Result<()> {
    let ckpt = checkpoint::resolve(&ckpt)?;
    let base = checkpoint::load_config(&ckpt)?;
    if teacher {
        set.push("eval.teacher=true".into());
    }
    let cfg = Config::from_toml(&base.to_toml(), &ckpt.join("config.toml").display().to_string(), &set)?;
    let (device, autocast) = selfsup_pipeline::prepare_device(cfg.train.device, cfg.train.bf16)?;
    let source = selfsup_pipeline::source::open_with(&cfg.data.train, cfg.data.open_options())?;
    // The sets checked against the network before the (long) feature extraction.
    if let Some(why) = transfer::plan(&cfg, source.channels())? {
        bail!("nothing to evaluate: {why} (--set data.test=... / eval.train=... name the labeled sets)");
    }
    let mut model = trainer::build_model(&cfg, source.channels(), device)?;
    checkpoint::load_weights(&mut model.vs, &ckpt)?;
    say!("evaluating {}", ckpt.display());
    // checkpoints live in <run>/checkpoints/<name>: the report goes to the run folder by default.
    let dir =
        out.unwrap_or_else(|| ckpt.parent().and_then(Path::parent).map_or_else(|| ckpt.clone(), Path::to_path_buf));
    let files = ["eval.json", "projector", "projector_config.pbtxt"];
    output::check(Output::Folder { dir: &dir, files: &files }, &cfg.inputs(), overwrite, "--out")?;
    let _lock = RunLock::acquire(&dir, "selfsup eval")?;
    let ctx = EvalContext {
        cfg: &cfg,
        device,
        threads: cfg.train.threads,
        autocast,
        projector_dir: Some(&dir),
        dist: None,
        progress: true,
    };
    let report = transfer::evaluate(model.eval_backbone(&cfg), &ctx, &mut NullSink, 0)?.expect("one process reports");
    out!("{report}");
    transfer::write_report(&report, &dir)?;
    out!("wrote {}", dir.join("eval.json").display());
    Ok(())
}

/// Fine-tunes checkpoint `ckpt` and the same backbone from scratch into `out/{pretrained,scratch}` and prints the
/// comparison (and, with `details`, both reports in full).
fn run_compare(cfg: &Config, ckpt: &Path, out: &Path, quiet: bool, details: bool) -> Result<()> {
    let (mut tp, mut ts) = (tensorboard_in(&out.join("pretrained"))?, tensorboard_in(&out.join("scratch"))?);
    let c = finetune::compare(cfg, ckpt, out, quiet, [&mut tp, &mut ts])?;
    if details {
        out!("{}\n{}", c.pretrained, c.scratch);
    }
    out!("{c}");
    out!("wrote {}", out.join("comparison.json").display());
    Ok(())
}

/// Creates `dir` and an event file in it.
fn tensorboard_in(dir: &Path) -> Result<TensorBoard> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    TensorBoard::create(dir).with_context(|| format!("creating the event file in {}", dir.display()))
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// A checkpoint folder, a run folder or its checkpoints folder (the latest is used): its backbone and its
    /// config (`[finetune]` is the recipe).
    #[arg(long, required_unless_present = "init_from")]
    checkpoint: Option<PathBuf>,
    /// Fine-tune a public backbone instead of a checkpoint: a safetensors file with torchvision ResNet or timm ViT
    /// names (or a `selfsup export`), loaded as `pretrain --init-from` loads it. The backbone, data and recipe
    /// come from --config, which must describe the file's network (e.g. `model.backbone.cifar_stem = false` for
    /// torchvision's stem; a ViT's position table is resampled to `image_size`, an RGB stem summed for gray data).
    #[arg(
        long,
        value_name = "W.safetensors",
        conflicts_with_all = ["checkpoint", "teacher", "from_scratch"],
        requires = "config"
    )]
    init_from: Option<PathBuf>,
    /// With --init-from: a TOML file or a built-in preset name giving the backbone, data and `[finetune]` recipe.
    #[arg(long, conflicts_with = "checkpoint")]
    config: Option<String>,
    /// Labeled training images (default: the checkpoint's finetune.train, else data.train).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Labeled test images (default: the checkpoint's finetune.test, else data.test).
    #[arg(long)]
    test: Option<PathBuf>,
    /// Keep this many labeled images per class (a fixed subset drawn with the run's seed).
    #[arg(long)]
    labels_per_class: Option<usize>,
    /// Fine-tuning epochs (default: the config's finetune.epochs).
    #[arg(long)]
    epochs: Option<usize>,
    /// Train only a linear head on the frozen backbone (default: full fine-tuning).
    #[arg(long)]
    linear: bool,
    /// Same backbone and recipe, random initialisation: the baseline.
    #[arg(long, conflicts_with = "compare")]
    from_scratch: bool,
    /// Run both, pretrained and from scratch, and print them side by side.
    #[arg(long)]
    compare: bool,
    /// Start from the momentum teacher's backbone (BYOL, MoCo v3, DINO) instead of the student's.
    #[arg(long)]
    teacher: bool,
    /// Override keys of the checkpoint's config (e.g. `finetune.base_lr=5e-4`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output folder (default: <run>/finetune-<UTC time>; with --init-from, runs/<name>-finetune-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Replace the results of an earlier fine-tune in --out (finetune.json, finetuned.safetensors, ...).
    #[arg(long)]
    overwrite: bool,
}

/// What a fine-tune writes into its output folder (`--compare`: the two sides and the comparison).
const FINETUNE_FILES: [&str; 6] =
    ["finetune.json", "finetuned.safetensors", "config.toml", "comparison.json", "pretrained", "scratch"];

fn finetune(a: FinetuneArgs) -> Result<()> {
    // The backbone's source (a checkpoint folder or a weights file), the config, where the config came from, and
    // the folder the default output goes under.
    let (ckpt, mut cfg, file, run_dir) = match (&a.checkpoint, &a.init_from) {
        (Some(c), _) => {
            let ckpt = checkpoint::resolve(c)?;
            let base = checkpoint::load_config(&ckpt)?;
            let file = ckpt.join("config.toml").display().to_string();
            let cfg = Config::from_toml(&base.to_toml(), &file, &a.set)?;
            let run_dir = ckpt.parent().and_then(Path::parent).map_or_else(|| ckpt.clone(), Path::to_path_buf);
            (ckpt, cfg, file, run_dir)
        }
        (None, Some(w)) => {
            let spec = a.config.clone().expect("clap requires --config with --init-from");
            let cfg = load_config(&spec, &a.set)?;
            (w.clone(), cfg, spec, PathBuf::from("runs"))
        }
        (None, None) => bail!("--checkpoint or --init-from is required"),
    };
    // The flags are shorthands for finetune.* keys; validated again with them applied.
    let f = &mut cfg.finetune;
    f.train = a.data.or(f.train.take());
    f.test = a.test.or(f.test.take());
    f.labels_per_class = a.labels_per_class.unwrap_or(f.labels_per_class);
    f.epochs = a.epochs.unwrap_or(f.epochs);
    if a.linear {
        f.mode = selfsup_pipeline::config::FinetuneMode::Linear;
    }
    f.teacher |= a.teacher;
    cfg.validate(&file)?;
    let out = a.out.unwrap_or_else(|| match a.init_from {
        Some(_) => run_dir.join(format!("{}-finetune-{}", cfg.name, utc_stamp())),
        None => run_dir.join(format!("finetune-{}", utc_stamp())),
    });
    let mut inputs = cfg.inputs();
    inputs.push(&ckpt);
    output::check(Output::Folder { dir: &out, files: &FINETUNE_FILES }, &inputs, a.overwrite, "--out")?;
    let _lock = RunLock::acquire(&out, "selfsup finetune")?;
    if a.compare {
        return run_compare(&cfg, &ckpt, &out, a.quiet, true);
    }
    let mut sink = tensorboard_in(&out)?;
    let checkpoint = (!a.from_scratch).then_some(ckpt);
    let report =
        finetune::finetune(&cfg, &FinetuneOptions { out: out.clone(), checkpoint, quiet: a.quiet }, &mut sink)?;
    out!("{report}");
    out!("wrote {}  (tensorboard --logdir {})", out.join("finetune.json").display(), out.display());
    Ok(())
}

fn export(ckpt: &Path, out: &Path, teacher: bool, overwrite: bool) -> Result<()> {
    if out.extension().is_none_or(|e| e != "safetensors") {
        bail!("--out {}: the file must end in .safetensors", out.display());
    }
    let ckpt = checkpoint::resolve(ckpt)?;
    output::check(Output::File(out), &[&ckpt], overwrite, "--out")?;
    let n = checkpoint::export_backbone(&ckpt, out, checkpoint::Which::from_teacher(teacher))?;
    let cfg = checkpoint::load_config(&ckpt)?;
    let names = match cfg.model.backbone {
        selfsup_models::BackboneConfig::Resnet(_) => "torchvision ResNet",
        selfsup_models::BackboneConfig::Vit(_) => "timm VisionTransformer",
    };
    let whose = if teacher { "teacher " } else { "" };
    out!("wrote {n} {whose}backbone tensors of {} to {} ({names} names)", ckpt.display(), out.display());
    Ok(())
}

fn inspect(data: &Path, channels: u8, json: Option<PathBuf>, overwrite: bool) -> Result<()> {
    let json = json.unwrap_or_else(|| {
        let name = data.file_name().map_or("data".into(), |n| n.to_string_lossy().into_owned());
        PathBuf::from(format!("{name}.inspect.json"))
    });
    output::check(Output::File(&json), &[data], overwrite, "--json")?;
    let source = selfsup_pipeline::source::open(data, channels)?;
    let report = selfsup_pipeline::inspect::inspect(source.as_ref(), &data.display().to_string(), true);
    out!("{report}");
    selfsup_pipeline::write_json_atomic(&json, &report)?;
    out!("wrote {}", json.display());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pretrain { config, set, out, resume, overwrite, quiet, nproc_per_node, init_from } => {
            match nproc_per_node {
                Some(n) => launch_ranks(n as usize, out),
                None => pretrain(config, set, out, resume, overwrite, quiet, init_from),
            }
        }
        Command::Eval { checkpoint, set, out, teacher, overwrite } => eval(checkpoint, set, out, teacher, overwrite),
        Command::Finetune(args) => finetune(args),
        Command::Export { checkpoint, out, teacher, overwrite } => export(&checkpoint, &out, teacher, overwrite),
        Command::Info => info::print(),
        Command::Presets => {
            out!("{}", presets::list(&PRESETS).trim_end());
            Ok(())
        }
        Command::Completions { shell } => {
            presets::completions(shell, &mut <Cli as clap::CommandFactory>::command());
            Ok(())
        }
        Command::Inspect { data, channels, json, overwrite } => inspect(&data, channels, json, overwrite),
        Command::BenchLoader { config, set, seconds, threads, gpu_img_per_s } => {
            bench::run(&config, &set, bench::Options { seconds, threads, gpu_img_per_s })
        }
        Command::Pack { src, out, channels, encoded, shuffle, codec, level, deflate, overwrite } => {
            output::check(Output::File(&out), &[&src], overwrite, "OUT")
                .map_err(anyhow::Error::from)
                .and_then(|()| pack(&src, &out, channels, encoded, shuffle, codec_of(codec, level, deflate)))
        }
    };
    if let Err(e) = result {
        say!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The codec the pack flags ask for (`--deflate N` is `--codec deflate --level N`).
fn codec_of(codec: CodecArg, level: Option<u8>, deflate: Option<u8>) -> Result<selfsup_pipeline::pack::Codec> {
    use selfsup_pipeline::pack::Codec;
    Ok(match (deflate, codec, level) {
        (Some(l), ..) => Codec::Deflate(l),
        (None, CodecArg::Lz4hc, Some(0)) => bail!("--level: lz4hc takes 1-9"),
        (None, CodecArg::Lz4hc, l) => Codec::Lz4hc(l.unwrap_or(9)),
        (None, CodecArg::Deflate, l) => Codec::Deflate(l.unwrap_or(4)),
        (None, CodecArg::None, Some(_)) => bail!("--level: --codec none has no level"),
        (None, CodecArg::None, None) => Codec::None,
    })
}

fn pack(
    src: &Path,
    out: &Path,
    channels: u8,
    encoded: bool,
    shuffle: Option<u64>,
    codec: Result<selfsup_pipeline::pack::Codec>,
) -> Result<()> {
    let opts = selfsup_pipeline::pack::PackOptions {
        channels,
        encoded,
        shuffle,
        codec: codec?,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    selfsup_pipeline::pack::pack(src, out, &opts)
        .map(|summary| out!("{summary}"))
        .with_context(|| format!("packing {} into {}", src.display(), out.display()))
}

/// `selfsup pack --codec`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CodecArg {
    Lz4hc,
    Deflate,
    None,
}
