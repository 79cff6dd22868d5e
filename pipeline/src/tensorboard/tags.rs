//! What every tag selfsup writes means: its description, shown in TensorBoard's cards (and in the tag lists of
//! its HTTP API). One table, so that a new tag without a description fails the test that reads a run back.

/// The description of `tag` (Markdown), or `None` for a tag nobody described.
pub fn describe(tag: &str) -> Option<String> {
    if let Some(term) = tag.strip_prefix("train/loss/") {
        return Some(format!(
            "The objective's **{term}** term{}, unweighted, averaged over the steps since the last log point. \
             Each objective names its own terms, so runs of different objectives are compared term by term; \
             `train/loss` is their weighted sum.",
            term_detail(term).map(|d| format!(" ({d})")).unwrap_or_default()
        ));
    }
    if let Some(name) = tag.strip_prefix("weights/") {
        return Some(format!(
            "Values of parameter `{name}` every `log.histogram_every` steps (30 equal-width buckets between its \
             min and max, computed on the device)."
        ));
    }
    if let Some(name) = tag.strip_prefix("gradients/") {
        return Some(format!(
            "Gradient of parameter `{name}` after backward (and the all-reduce across ranks), before the \
             optimizer step, every `log.histogram_every` steps."
        ));
    }
    let fixed = match tag {
        "train/loss" => {
            "The loss that is backpropagated (the objective's weighted sum of its terms), averaged over \
                         the steps since the last log point. Its scale depends on the objective: compare runs of \
                         different objectives by `train/loss/<term>` or by `val/knn_top1`."
        }
        "train/lr" => {
            "Learning rate of the last step (peak lr = optimizer.base_lr x global batch / 256, linear \
                       warm-up then cosine decay)."
        }
        "train/epoch" => "Training progress in epochs (fractional: step / steps per epoch).",
        "train/grad_norm" => {
            "Global L2 norm of all gradients before clipping (`optimizer.clip_grad`), averaged \
                              over the steps since the last log point."
        }
        "train/images_per_s" => {
            "Training throughput: images (global batch, all ranks) per second of wall time \
                                 since the last log point, data loading included."
        }
        "train/data_wait_fraction" => {
            "Share of the wall time the trainer waited for the data loader (0 = the \
                                       device never waited; above ~0.05 the loader is the bottleneck: more \
                                       train.threads or a packed HDF5 file)."
        }
        "train/embedding_std" => {
            "Collapse monitor: std per dimension of the l2-normalized embeddings x sqrt(D), \
                                  averaged over dimensions (1 = spread over the sphere, 0 = collapsed to one \
                                  point). A warning is printed below train.collapse_warn_std."
        }
        "train/effective_rank" => {
            "Collapse monitor: effective rank (exp of the entropy of the normalized \
                                   singular values) of the batch's embeddings; 1 = all embeddings on one line."
        }
        "train/online_probe_top1" => {
            "Top-1 accuracy (0-1) of a linear classifier trained on the detached \
                                      backbone features of the training batches as they come (labels never reach \
                                      the backbone), over the steps since the last log point."
        }
        "train/skipped_steps" => {
            "Steps whose update was skipped for a non-finite loss or gradient norm \
                                  (train.on_nonfinite = \"skip\"), counted since the start of training."
        }
        "train/teacher_momentum" => {
            "EMA momentum of the teacher at the last step (cosine from `momentum` to \
                                     `momentum_end`): teacher = m x teacher + (1 - m) x student."
        }
        "train/teacher_temperature" => {
            "DINO's teacher softmax temperature at the last step (linear warm-up from \
                                        `warmup_teacher_temp` to `teacher_temp`)."
        }
        "grad_norm/per_parameter" => {
            "Distribution of the L2 norms of the parameters' gradients (one sample per \
                                      parameter tensor), every `log.histogram_every` steps: a layer whose \
                                      gradients vanish or explode shows up at the ends."
        }
        "val/knn_top1" => {
            "Validation curve: weighted k-NN top-1 (0-1; k = eval.knn_k, temperature \
                           eval.knn_temperature, cosine similarity) of the backbone's features after every \
                           `eval.knn_every` epochs, on a bounded subset for speed: the first `eval.val_test_size` \
                           test images against a bank of the first `eval.val_bank_size` training images (0 = \
                           all). The end-of-run `eval/knn_top1` uses the whole sets."
        }
        "eval/knn_top1" => {
            "End of run: weighted k-NN top-1 (0-1) on the whole test set against a bank of the \
                            labeled training set (eval.train_limit images if set)."
        }
        "eval/linear_top1" => {
            "End of run: top-1 (0-1) of a linear probe (eval.probe_epochs of SGD on frozen, \
                               standardized features) on the test set."
        }
        "eval/linear_worst_class_top1" => "End of run: the linear probe's accuracy on its worst class (0-1).",
        "eval/raw_pixels_linear_top1" => {
            "End of run: the same linear probe on raw normalized pixels, the \
                                          baseline pretraining must beat."
        }
        "eval/linear_confusion_matrix" => {
            "End of run: the linear probe's confusion matrix on the test set. Rows: \
                                           true class, columns: predicted class; colour and number: share of \
                                           the row's images (viridis, dark = 0%, yellow = 100%)."
        }
        "eval/report" => {
            "End of run: the evaluation as a table (k-NN, linear probe, raw-pixel baseline, \
                          per-class accuracy)."
        }
        "views/pairs" => {
            "The augmented views the objective trains on, for the first training images at step 0: \
                          each image's views side by side, about 8 tiles per row (4 pairs, or one multi-crop \
                          sample per row; smaller views centered in their cells)."
        }
        "views/single" => {
            "The augmented input of single-view objectives (MAE, SimMIM) for the first training \
                           images at step 0."
        }
        "reconstruction/original_masked_reconstructed" => {
            "Masked-image objectives: for fixed training images, \
                                                           the original, the visible patches, and the model's \
                                                           reconstruction (visible patches pasted back), every \
                                                           train.recon_every epochs."
        }
        "config/resolved" => {
            "The run's resolved configuration (every key, defaults filled in), as `config.toml` \
                              beside the event file."
        }
        "config/command_line" => "The command line that started this process (a resume writes its own).",
        "config/init_from" => {
            "The weights file the backbone started from (pretrain --init-from), its SHA-256, and what was loaded, \
             left out and adapted; also init_from.json beside the event files."
        }
        "config/changes" => {
            "What a --resume changed in the recipe (key, value until this step, value from it on); the config \
             until then is kept as config-before-step-<step>.toml beside the event files."
        }
        "finetune/lr" => "Fine-tuning learning rate at the last step of each epoch (warm-up then cosine).",
        "finetune/train_loss" => {
            "Fine-tuning cross-entropy (with finetune.label_smoothing), mean over the epoch's \
                                  steps."
        }
        "finetune/test_top1" => {
            "Fine-tuned classifier's top-1 (0-1) on the test set after each evaluated epoch \
                                 (finetune.eval_every; always the last)."
        }
        "finetune/confusion_matrix" => {
            "Fine-tuned classifier's confusion matrix on the test set (rows: true \
                                        class, columns: predicted; colour and number: share of the row)."
        }
        "finetune/report" => "The fine-tuning result: top-1, per-class and worst-class accuracy.",
        _ => return None,
    };
    Some(fixed.to_string())
}

/// What the objectives' loss terms are.
fn term_detail(term: &str) -> Option<&'static str> {
    Some(match term {
        "nt_xent" => "SimCLR: normalized-temperature cross-entropy over the 2N views",
        "infonce" => "MoCo v3: symmetric InfoNCE of the predictions against the EMA keys",
        "normalized_mse" => "BYOL: symmetric MSE of l2-normalized predictions and EMA targets",
        "dino" => "DINO: cross-entropy of student views against centered, sharpened teacher globals",
        "ibot" => "iBOT: masked patch-token cross-entropy on the global crops",
        "koleo" => "KoLeo: minus the log distance of each embedding to its nearest neighbour",
        "invariance" => "VICReg: MSE between the two views' embeddings",
        "variance" => "VICReg: hinge on the per-dimension std of each view's embeddings",
        "covariance" => "VICReg: squared off-diagonal covariances",
        "on_diagonal" => "Barlow Twins: (1 - C_ii)^2 summed over the cross-correlation's diagonal",
        "off_diagonal" => "Barlow Twins: C_ij^2 summed off the diagonal (before lambda)",
        "pixel_mse" => "MAE: MSE of the reconstructed masked patches (normalized pixels if norm_pix_loss)",
        "pixel_l1" => "SimMIM: L1 of the reconstructed masked pixels",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_tags_are_described_and_unknown_ones_are_not() {
        assert!(describe("train/loss/dino").unwrap().contains("DINO"));
        assert!(describe("train/loss/anything").is_some());
        assert!(describe("weights/backbone.conv1.weight").unwrap().contains("backbone.conv1.weight"));
        assert!(describe("gradients/head.0.bias").is_some());
        assert!(describe("val/knn_top1").unwrap().contains("val_bank_size"));
        assert_eq!(describe("no/such/tag"), None);
    }
}
