//! What a run tells TensorBoard about itself besides curves: its hyperparameters and the metrics that judge it
//! (the HParams tab), and Markdown for the Text tab: the resolved config, the command line, and the
//! evaluation's per-class table.

use crate::config::Config;
use crate::eval::ClassReport;
use crate::tensorboard::{HParam, HValue, Metric, Session};
use crate::transfer::EvalReport;

/// The short name of the configured backbone (`ResNet(layers [2, 2, 2, 2], width 64)`, `ViT(depth 12, ...)`).
pub fn backbone_name(cfg: &Config) -> String {
    match &cfg.model.backbone {
        selfsup_models::BackboneConfig::Resnet(r) => format!("ResNet(layers {:?}, width {})", r.layers, r.width),
        selfsup_models::BackboneConfig::Vit(v) => {
            format!("ViT(depth {}, width {}, heads {}, patch {})", v.depth(), v.width(), v.heads(), v.patch_size)
        }
    }
}

/// The views as `count x size` groups in order: `2x28`, `2x28+6x12`.
pub fn views_summary(cfg: &Config) -> String {
    let mut groups: Vec<(u32, usize)> = Vec::new();
    for v in cfg.view_recipes() {
        match groups.last_mut() {
            Some((size, n)) if *size == v.size => *n += 1,
            _ => groups.push((v.size, 1)),
        }
    }
    groups.iter().map(|(s, n)| format!("{n}x{s}")).collect::<Vec<_>>().join("+")
}

/// The run's hyperparameters: the same names for every objective (so that the HParams table lines up SimCLR,
/// DINO and MAE runs), with the objective's own temperature, momentum or mask ratio where it has one; and its
/// metrics: the last validation k-NN, the end-of-run evaluation and, with `finetune.at_end`, both fine-tunes.
/// `bf16` is whether bf16 autocast is in effect (`train.bf16` on CUDA; the CPU always trains in f32).
pub fn session(cfg: &Config, world_size: usize, bf16: bool) -> Session {
    let text = |s: String| HValue::Text(s);
    let json = serde_json::to_value(cfg).unwrap_or_default();
    let objective = &json["objective"];
    let mut hparams = vec![
        HParam { name: "preset", description: "The config's `name` (its preset).", value: text(cfg.name.clone()) },
        HParam {
            name: "objective",
            description: "The pretraining objective (`objective.kind`).",
            value: text(objective["kind"].as_str().unwrap_or("?").to_string()),
        },
        HParam { name: "backbone", description: "The backbone (`model.backbone`).", value: text(backbone_name(cfg)) },
        HParam {
            name: "optimizer",
            description: "`optimizer.kind`.",
            value: text(json["optimizer"]["kind"].as_str().unwrap_or("?").to_string()),
        },
        HParam {
            name: "lr",
            description: "`optimizer.base_lr`: learning rate per 256 images (scaled with the batch).",
            value: HValue::Number(cfg.optimizer.base_lr),
        },
        HParam {
            name: "weight_decay",
            description: "`optimizer.weight_decay`.",
            value: HValue::Number(cfg.optimizer.weight_decay),
        },
        HParam {
            name: "batch_size",
            description: "`train.batch_size`, the global batch.",
            value: HValue::Number(cfg.train.batch_size as f64),
        },
        HParam { name: "epochs", description: "`train.epochs`.", value: HValue::Number(cfg.train.epochs as f64) },
        HParam {
            name: "views",
            description: "The views each image gives, as count x side in pixels.",
            value: text(views_summary(cfg)),
        },
        HParam {
            name: "data",
            description: "`data.train` (file or folder name).",
            value: text(cfg.data.train.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())),
        },
        HParam { name: "seed", description: "The master `seed`.", value: HValue::Number(cfg.seed as f64) },
        HParam {
            name: "world_size",
            description: "Processes training together (1 = no data parallelism).",
            value: HValue::Number(world_size as f64),
        },
        HParam {
            name: "bf16",
            description: "bf16 autocast in effect: `train.bf16` on CUDA; false on the CPU, which trains in f32.",
            value: HValue::Bool(bf16),
        },
    ];
    let optional: [(&'static str, &'static str, &[&str]); 3] = [
        (
            "temperature",
            "The objective's (student) softmax temperature, where it has one.",
            &["temperature", "student_temp"],
        ),
        ("momentum", "The teacher's EMA momentum at the start, where there is a teacher.", &["momentum"]),
        ("mask_ratio", "Share of patches masked, for masked-image objectives.", &["mask_ratio"]),
    ];
    let mut declared = Vec::new();
    for (name, description, keys) in optional {
        declared.push((name, description, HValue::Number(0.0)));
        if let Some(v) = keys.iter().find_map(|k| objective[*k].as_f64()) {
            hparams.push(HParam { name, description, value: HValue::Number(v) });
        }
    }
    let mut metrics = vec![
        Metric {
            tag: "val/knn_top1",
            group: "",
            display_name: "val k-NN top-1",
            description: "The last point of the validation curve (k-NN on a bounded subset).",
            validation: true,
        },
        Metric {
            tag: "eval/knn_top1",
            group: "",
            display_name: "k-NN top-1",
            description: "End of run, whole test set.",
            validation: true,
        },
        Metric {
            tag: "eval/linear_top1",
            group: "",
            display_name: "linear top-1",
            description: "End of run: linear probe on frozen features.",
            validation: true,
        },
        Metric {
            tag: "eval/linear_worst_class_top1",
            group: "",
            display_name: "worst class",
            description: "End of run: the linear probe's worst class.",
            validation: true,
        },
        Metric {
            tag: "eval/raw_pixels_linear_top1",
            group: "",
            display_name: "raw pixels linear",
            description: "The baseline: the same probe on raw pixels.",
            validation: true,
        },
        Metric {
            tag: "train/loss",
            group: "",
            display_name: "final loss",
            description: "The last logged training loss (objective-specific scale).",
            validation: false,
        },
        Metric {
            tag: "train/embedding_std",
            group: "",
            display_name: "embedding std",
            description: "Collapse monitor at the end (1 = spread, 0 = collapsed).",
            validation: false,
        },
        Metric {
            tag: "train/images_per_s",
            group: "",
            display_name: "images/s",
            description: "Training throughput at the last log point.",
            validation: false,
        },
    ];
    if cfg.finetune.at_end {
        metrics.push(Metric {
            tag: "finetune/test_top1",
            group: "finetune/pretrained",
            display_name: "fine-tune top-1",
            description: "Fine-tuning the pretrained backbone (finetune.at_end).",
            validation: true,
        });
        metrics.push(Metric {
            tag: "finetune/test_top1",
            group: "finetune/scratch",
            display_name: "scratch top-1",
            description: "The same recipe from a random initialisation.",
            validation: true,
        });
    }
    let start_time_secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    Session { hparams, declared, metrics, start_time_secs }
}

/// The resolved config as a fenced TOML block.
pub fn config_markdown(cfg: &Config) -> String {
    format!("```toml\n{}\n```", cfg.to_toml().trim_end())
}

/// What the backbone started from (`pretrain --init-from`), for the text tab.
pub fn init_from_markdown(i: &crate::pretrained::Imported) -> String {
    let mut md = format!(
        "The backbone{} started from `{}` (SHA-256 `{}`): {} tensors loaded.",
        if i.teacher { " and its momentum teacher" } else { "" },
        i.file.display(),
        i.sha256,
        i.loaded
    );
    if !i.dropped.is_empty() {
        md += &format!(
            "\n\nLeft out ({}): {}",
            i.dropped.len(),
            i.dropped.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ")
        );
    }
    for a in &i.adapted {
        md += &format!("\n\n- {a}");
    }
    md
}

/// This process's command line, each argument quoted where the shell would need it.
pub fn command_line_markdown() -> String {
    let args: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    format!("```sh\n{}\n```", args.join(" "))
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// A per-class accuracy table (Markdown) of one or more reports side by side, e.g. k-NN and linear probe.
pub fn class_table(columns: &[(&str, &ClassReport)]) -> String {
    let Some((_, first)) = columns.first() else { return String::new() };
    let mut s = String::from("| class | images |");
    for (name, _) in columns {
        s += &format!(" {name} |");
    }
    s += "\n|---|---:|";
    s += &"---:|".repeat(columns.len());
    for (i, c) in first.per_class.iter().enumerate() {
        s += &format!("\n| {} | {} |", c.class.replace('|', "\\|"), c.count);
        for (_, r) in columns {
            s += &r.per_class.get(i).map_or(" |".to_string(), |c| format!(" {:.2}% |", 100.0 * c.accuracy));
        }
    }
    s += "\n| **all** | |";
    for (_, r) in columns {
        s += &format!(" **{:.2}%** |", 100.0 * r.top1);
    }
    s
}

/// The end-of-run evaluation as Markdown: top-1 of each method, then the per-class table.
pub fn eval_markdown(r: &EvalReport) -> String {
    let mut s = format!(
        "Evaluation on {} test images ({} labeled training images, {}-d features), {:.1} s.\n\n\
         | method | top-1 |\n|---|---:|\n| k-NN (k={}, T={}) | {:.2}% |\n| linear probe | {:.2}% |\n",
        r.test_samples,
        r.train_samples,
        r.feature_dim,
        r.seconds,
        r.knn_k,
        r.knn_temperature,
        100.0 * r.knn.top1,
        100.0 * r.linear.top1
    );
    if let Some(raw) = &r.raw_pixels_linear {
        s += &format!("| linear probe on raw pixels (baseline) | {:.2}% |\n", 100.0 * raw.top1);
    }
    s += &format!(
        "\nWorst class (linear probe): **{}** at {:.2}%.\n\n",
        r.linear.worst_class,
        100.0 * r.linear.worst_accuracy
    );
    s += &class_table(&[("k-NN", &r.knn), ("linear", &r.linear)]);
    if r.unreadable_samples > 0 {
        s += &format!("\n\n{} unreadable samples were left out.", r.unreadable_samples);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_declares_the_same_hparam_names_and_its_own_values() {
        let simclr = Config::default();
        let mut mae = Config::default();
        mae.objective = selfsup_models::ObjectiveConfig::Mae(Default::default());
        let (a, b) = (session(&simclr, 1, false), session(&mae, 2, true));
        let names = |s: &Session| s.hparams.iter().map(|h| h.name).collect::<Vec<_>>();
        let common: Vec<_> = names(&a).into_iter().filter(|n| names(&b).contains(n)).collect();
        assert!(common.len() >= 13, "{common:?}");
        let get = |s: &Session, n: &str| s.hparams.iter().find(|h| h.name == n).map(|h| h.value.clone());
        assert_eq!(get(&a, "objective"), Some(HValue::Text("simclr".into())));
        assert_eq!(get(&b, "objective"), Some(HValue::Text("mae".into())));
        assert_eq!(get(&b, "world_size"), Some(HValue::Number(2.0)));
        // The autocast in effect, not the config's wish (train.bf16 is true by default, also on the CPU).
        assert!(simclr.train.bf16);
        assert_eq!((get(&a, "bf16"), get(&b, "bf16")), (Some(HValue::Bool(false)), Some(HValue::Bool(true))));
        assert!(get(&a, "temperature").is_some() && get(&a, "mask_ratio").is_none());
        assert!(get(&b, "mask_ratio").is_some());
        // Both declare the same columns, values or not.
        let columns = |s: &Session| {
            let mut c: Vec<&str> = s.hparams.iter().map(|h| h.name).chain(s.declared.iter().map(|d| d.0)).collect();
            c.sort();
            c.dedup();
            c
        };
        assert_eq!(columns(&a), columns(&b));
        assert_eq!(get(&a, "views"), Some(HValue::Text("2x28".into())));
    }

    #[test]
    fn command_lines_are_quoted_as_a_shell_reads_them() {
        assert_eq!(shell_quote("--set"), "--set");
        assert_eq!(shell_quote("train.epochs=5"), "train.epochs=5");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
