//! Importing a public backbone's weights (`pretrain --init-from`, `finetune --init-from`): a safetensors file with
//! torchvision ResNet names (`conv1.weight`, `layer1.0.bn1.running_mean`, ...) or timm ViT names (`cls_token`,
//! `pos_embed`, `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...), the names our backbones already have
//! (so [`crate::checkpoint::export_backbone`]'s files come back in too, and a selfsup `model.safetensors`, whose
//! `backbone.*` tensors are taken).
//!
//! - Left out, as every PyTorch user expects: the classifier (`fc.*`, `head.*`) and batch norm's
//!   `num_batches_tracked` counters (tch keeps none). A `module.` prefix on every name (DDP) is stripped.
//! - Adapted, as timm's `checkpoint_filter_fn` / `adapt_input_conv` do when a model of another size loads
//!   pretrained weights: a ViT `pos_embed` of another patch grid is resampled to the config's grid (bicubic,
//!   antialiased, the cls row kept; a table without a cls row gets a zero one, which is what timm's
//!   `no_embed_class` computes), and an RGB stem (`conv1.weight`, `patch_embed.proj.weight` with 3 input channels)
//!   into 1-channel data is summed over its input channels: exactly the network fed the gray image repeated
//!   three times. Any other channel count is an error naming `data.channels`.
//! - Everything else must match: one error, naming the file, lists the missing keys, the unexpected keys and the
//!   shape mismatches (name, expected shape, got shape), with hints naming the `model.backbone` fields to change.
//! - A tensor holding a NaN or an infinity is refused, naming it (the check checkpoints use).
//!
//! Only backbone variables (`backbone.*`) are written, and their momentum-teacher twins (`teacher.backbone.*`)
//! with the same values, since a teacher starts as its student; heads keep their initialisation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use selfsup_models::backbone::resample_pos_embed_antialiased;
use selfsup_models::{BackboneConfig, ResNetBlock};
use tch::nn::VarStore;
use tch::Tensor;

use crate::checkpoint::{first_nonfinite, CheckpointError};

/// What [`load_backbone_file`] did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Imported {
    /// The file, as given, and its SHA-256 (what the run's `init_from.json` and summary record).
    pub file: PathBuf,
    pub sha256: String,
    /// Backbone tensors loaded (each also into the momentum teacher's twin when the model has one).
    pub loaded: usize,
    /// Also loaded into the momentum teacher.
    pub teacher: bool,
    /// Tensors of the file left out: the classifier, batch-norm counters, a selfsup file's heads.
    pub dropped: Vec<String>,
    /// What was adapted, in words.
    pub adapted: Vec<String>,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let teacher = if self.teacher { " (and the momentum teacher)" } else { "" };
        write!(f, "initialised the backbone{teacher} from {}: {} tensors", self.file.display(), self.loaded)?;
        write!(f, " (sha256 {})", &self.sha256[..self.sha256.len().min(12)])?;
        if !self.dropped.is_empty() {
            write!(f, "; left out {}", summarize_dropped(&self.dropped))?;
        }
        for a in &self.adapted {
            write!(f, "\n  {a}")?;
        }
        Ok(())
    }
}

/// `fc.weight, fc.bias, 20 x num_batches_tracked`: counters are many and alike, so they are counted.
fn summarize_dropped(names: &[String]) -> String {
    let counters = names.iter().filter(|n| n.ends_with("num_batches_tracked")).count();
    let mut parts: Vec<String> = names.iter().filter(|n| !n.ends_with("num_batches_tracked")).cloned().collect();
    if parts.len() > 8 {
        let more = parts.len() - 6;
        parts.truncate(6);
        parts.push(format!("{more} more"));
    }
    if counters > 0 {
        parts.push(format!("{counters} x num_batches_tracked"));
    }
    parts.join(", ")
}

fn invalid(file: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::Invalid { path: file.to_path_buf(), message: message.to_string() }
}

/// One line for the backbone a config asks for, naming its fields.
fn describe(cfg: &BackboneConfig) -> String {
    match cfg {
        BackboneConfig::Resnet(r) => {
            let block = if r.block == ResNetBlock::Bottleneck { "bottleneck" } else { "basic" };
            let stem = if r.cifar_stem { "cifar_stem = true (3x3)" } else { "cifar_stem = false (7x7 + max-pool)" };
            format!("ResNet: layers = {:?}, width = {}, block = {block}, {stem}", r.layers, r.width)
        }
        BackboneConfig::Vit(v) => format!(
            "ViT: depth = {}, width = {}, heads = {}, patch_size = {}, image_size = {}",
            v.depth(),
            v.width(),
            v.heads(),
            v.patch_size,
            v.image_size
        ),
    }
}

/// Which family a file's names come from, if recognisable.
fn family(names: &[&str]) -> Option<&'static str> {
    if names.iter().any(|n| *n == "patch_embed.proj.weight" || n.starts_with("blocks.")) {
        Some("a timm ViT")
    } else if names.iter().any(|n| n.starts_with("layer1.")) {
        Some("a torchvision ResNet")
    } else {
        None
    }
}

/// The file's tensors under the names our backbone would have (the selfsup and DDP prefixes stripped), and those
/// left out as expected.
fn normalize(tensors: Vec<(String, Tensor)>) -> (BTreeMap<String, Tensor>, Vec<String>) {
    let ours = tensors.iter().any(|(n, _)| n.starts_with("backbone."));
    let ddp = !ours && !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with("module."));
    let (mut kept, mut dropped) = (BTreeMap::new(), Vec::new());
    for (name, t) in tensors {
        let stripped = if ours {
            name.strip_prefix("backbone.")
        } else if ddp {
            name.strip_prefix("module.")
        } else {
            Some(name.as_str())
        };
        match stripped {
            Some(n) if !(n.starts_with("fc.") || n.starts_with("head.") || n.ends_with("num_batches_tracked")) => {
                kept.insert(n.to_string(), t);
            }
            _ => dropped.push(name),
        }
    }
    (kept, dropped)
}

/// The stem convolution of the config's backbone: the one tensor whose input channels are the data's.
fn stem_name(cfg: &BackboneConfig) -> &'static str {
    match cfg {
        BackboneConfig::Resnet(_) => "conv1.weight",
        BackboneConfig::Vit(_) => "patch_embed.proj.weight",
    }
}

/// An integer square root, if `n` is a square.
fn square_side(n: i64) -> Option<i64> {
    let s = (n as f64).sqrt().round() as i64;
    (s >= 1 && s * s == n).then_some(s)
}

/// `src` adapted to `want`'s shape as timm would, with a sentence saying how; `None` when no adaptation applies.
fn adapt(name: &str, src: &Tensor, want: &[i64], cfg: &BackboneConfig) -> Option<(Tensor, String)> {
    let got = src.size();
    if name == stem_name(cfg) && got.len() == 4 && want.len() == 4 && got[1] == 3 && want[1] == 1 {
        let same_rest = got[0] == want[0] && got[2..] == want[2..];
        return same_rest.then(|| {
            let t = src.sum_dim_intlist(1, true, src.kind());
            (t, format!("{name}: the 3 input channels summed into the data's 1 (timm's adapt_input_conv)"))
        });
    }
    if name == "pos_embed" && matches!(cfg, BackboneConfig::Vit(_)) && got.len() == 3 && want.len() == 3 {
        if got[0] != 1 || want[0] != 1 || got[2] != want[2] {
            return None;
        }
        let to = square_side(want[1] - 1)?;
        let (cls, patches, from, note) = match square_side(got[1] - 1) {
            Some(s) => (src.narrow(1, 0, 1), src.narrow(1, 1, got[1] - 1), s, ""),
            None => {
                // No cls row (timm's no_embed_class): its token gets no position, a zero row here.
                let s = square_side(got[1])?;
                (src.narrow(1, 0, 1).zeros_like(), src.shallow_clone(), s, ", a zero row for the cls token")
            }
        };
        let resampled = resample_pos_embed_antialiased(&patches, (from, from), (to, to));
        let how = if from == to {
            String::new()
        } else {
            format!(" resampled {from}x{from} -> {to}x{to} (bicubic, antialiased, as timm)")
        };
        return Some((Tensor::cat(&[cls, resampled], 1), format!("pos_embed:{how}{note}")));
    }
    None
}

/// Hints for a shape mismatch of the stem, naming the config fields that decide its shape (other tensors' shapes
/// follow the width and depth: one generic hint).
fn stem_hints(name: &str, want: &[i64], got: &[i64], cfg: &BackboneConfig) -> Vec<String> {
    let mut hints = Vec::new();
    if name != stem_name(cfg) || want.len() != 4 || got.len() != 4 {
        return hints;
    }
    if want[1] != got[1] && !(got[1] == 3 && want[1] == 1) {
        hints.push(format!(
            "{name}: the file's stem takes {} input channel(s), the data has {} (data.channels; only 3 -> 1 is \
             adapted, by summing as timm does)",
            got[1], want[1]
        ));
    }
    if want[2..] != got[2..] {
        hints.push(match cfg {
            BackboneConfig::Resnet(_) => format!(
                "{name}: a {}x{} stem in the file, {}x{} here: model.backbone.cifar_stem = false is torchvision's 7x7 \
                 stem, true the 3x3 CIFAR one",
                got[2], got[3], want[2], want[3]
            ),
            BackboneConfig::Vit(_) => {
                format!(
                    "{name}: {}x{} patches in the file, model.backbone.patch_size = {} here",
                    got[2], got[3], want[2]
                )
            }
        });
    }
    hints
}

/// Up to `max` names, then how many more.
fn listing(names: &[String], max: usize) -> String {
    let mut s = names.iter().take(max).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > max {
        s += &format!(", ... ({} more)", names.len() - max);
    }
    s
}

/// Loads the backbone weights of `file` into the variables of `vs` named `backbone.*` (and `teacher.backbone.*`)
/// of a model built from `cfg` (see the module docs for the names accepted, what is left out and adapted). All
/// or nothing: on any mismatch nothing is written and the error lists every missing, unexpected and mis-shaped
/// tensor.
pub fn load_backbone_file(vs: &VarStore, file: &Path, cfg: &BackboneConfig) -> Result<Imported, CheckpointError> {
    if !file.is_file() {
        let error = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (a safetensors file expected)");
        return Err(CheckpointError::Io { path: file.to_path_buf(), error });
    }
    crate::checkpoint::verify_if_listed(file)?;
    let tensors = Tensor::read_safetensors(file)
        .map_err(|e| invalid(file, format!("not a readable safetensors file (truncated or another format?): {e}")))?;
    if let Some(name) = first_nonfinite(tensors.iter().map(|(n, t)| (n.as_str(), t))) {
        return Err(invalid(file, format!("tensor {name} holds NaN or infinite values: refusing these weights")));
    }
    let (theirs, dropped) = normalize(tensors);
    let vars = vs.variables();
    let ours: BTreeMap<&str, &Tensor> =
        vars.iter().filter_map(|(n, t)| n.strip_prefix("backbone.").map(|n| (n, t))).collect();
    if ours.is_empty() {
        return Err(invalid(file, "the model has no backbone.* variables to load into"));
    }
    let (mut missing, mut mismatched, mut hints) = (Vec::new(), Vec::new(), Vec::new());
    let mut other_shapes = false;
    let (mut copies, mut adapted): (Vec<(&str, Tensor)>, Vec<String>) = (Vec::new(), Vec::new());
    for (&name, var) in &ours {
        let Some(src) = theirs.get(name) else {
            missing.push(name.to_string());
            continue;
        };
        let want = var.size();
        if src.size() == want {
            copies.push((name, src.shallow_clone()));
        } else if let Some((t, note)) = adapt(name, src, &want, cfg) {
            copies.push((name, t));
            adapted.push(note);
        } else {
            mismatched.push(format!("{name}: expected {want:?}, got {:?}", src.size()));
            hints.extend(stem_hints(name, &want, &src.size(), cfg));
            other_shapes |= name != stem_name(cfg);
        }
    }
    let unexpected: Vec<String> = theirs.keys().filter(|n| !ours.contains_key(n.as_str())).cloned().collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        let names: Vec<&str> = theirs.keys().map(String::as_str).collect();
        let mut msg = format!(
            "does not fit model.backbone ({}): {} missing, {} unexpected, {} with another shape",
            describe(cfg),
            missing.len(),
            unexpected.len(),
            mismatched.len()
        );
        let asked = match cfg {
            BackboneConfig::Resnet(_) => "a torchvision ResNet",
            BackboneConfig::Vit(_) => "a timm ViT",
        };
        match family(&names) {
            Some(f) if f != asked => msg += &format!(" (the file holds {f}, the config asks for {asked})"),
            _ => {}
        }
        if !missing.is_empty() {
            msg += &format!("\n  missing (in the backbone, not in the file): {}", listing(&missing, 12));
        }
        if !unexpected.is_empty() {
            msg += &format!("\n  unexpected (in the file, not in the backbone): {}", listing(&unexpected, 12));
        }
        for m in mismatched.iter().take(20) {
            msg += &format!("\n  shape mismatch: {m}");
        }
        if mismatched.len() > 20 {
            msg += &format!("\n  ... ({} more shape mismatches)", mismatched.len() - 20);
        }
        if other_shapes {
            hints.push(match cfg {
                BackboneConfig::Resnet(_) => "a ResNet's shapes follow model.backbone.width and block".into(),
                BackboneConfig::Vit(_) => {
                    "a ViT's shapes follow model.backbone.size (or width, heads, mlp_ratio)".into()
                }
            });
        }
        if unexpected.iter().any(|n| n.starts_with("fc_norm.")) {
            hints.push(
                "fc_norm.* is timm's norm after pooling (global_pool='avg' with fc_norm); ours normalises the tokens \
                 before pooling (timm's fc_norm=False, whose name is norm.*)"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        hints.retain(|h| seen.insert(h.clone()));
        for h in hints.iter().take(4) {
            msg += &format!("\n  hint: {h}");
        }
        if !dropped.is_empty() {
            msg += &format!("\n  (left out as expected: {})", summarize_dropped(&dropped));
        }
        return Err(invalid(file, msg));
    }
    if let BackboneConfig::Vit(v) = cfg {
        if v.pos_embed == selfsup_models::PosEmbed::Sincos {
            adapted.push(
                "pos_embed: the file's table replaces the sin-cos one and stays fixed (model.backbone.pos_embed = \
                 \"sincos\"; \"learned\" trains it, as timm)"
                    .into(),
            );
        }
    }
    let twins: HashMap<&str, &Tensor> =
        vars.iter().filter_map(|(n, t)| n.strip_prefix("teacher.backbone.").map(|n| (n, t))).collect();
    tch::no_grad(|| {
        for (name, src) in &copies {
            ours[name].shallow_clone().copy_(src);
            if let Some(twin) = twins.get(name) {
                twin.shallow_clone().copy_(src);
            }
        }
    });
    let sha256 = crate::checkpoint::sha256_file(file)?;
    Ok(Imported {
        file: file.to_path_buf(),
        sha256,
        loaded: copies.len(),
        teacher: !twins.is_empty(),
        dropped,
        adapted,
    })
}

/// Checks, before a run writes anything, that `file` loads into `cfg`'s backbone (built on the CPU for the
/// channels the config's data will have): the same checks and errors as [`load_backbone_file`].
pub fn check_backbone_file(file: &Path, cfg: &crate::Config) -> Result<Imported, crate::Error> {
    let vs = VarStore::new(tch::Device::Cpu);
    let _backbone = cfg.model.backbone.build(vs.root() / "backbone", i64::from(cfg.channels_hint()))?;
    Ok(load_backbone_file(&vs, file, &cfg.model.backbone)?)
}
