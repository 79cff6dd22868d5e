//! What pretraining shows in TensorBoard besides curves: the augmented views at the start and, for masked-image
//! objectives, reconstruction grids.

use selfsup_augment::{Image, Rng, Views};
use selfsup_models::Objective;
use tch::{Device, Tensor};

use super::{step_seed, to_device};
use crate::config::Config;
use crate::source::{self, Source};
use crate::tensorboard::{grid, images_from_tensor, upscale, Sink};

/// The first `pairs` samples of epoch 0, every view side by side, as one image grid.
pub(super) fn preview(source: &dyn Source, views: &Views, order: &[usize], seed: u64, pairs: usize) -> Option<Image> {
    let mut tiles = Vec::new();
    for &i in order.iter().take(pairs) {
        let Ok(sample) = source.get(i) else { continue };
        let mut rng = Rng::for_sample(seed, 0, i as u64);
        for p in &views.recipes {
            let view = p.run_image(&sample.image, &mut rng);
            // Small views (28 px) are shown at least 56 px wide.
            let factor = (56 / view.width.max(1)).max(1);
            tiles.push(upscale(&view, factor));
        }
    }
    // About 8 tiles a row: 4 pairs, 8 single views, or one multi-crop sample (all its views) per row.
    let n = views.recipes.len().max(1);
    let per_row = n * (8 / n).max(1);
    (!tiles.is_empty()).then(|| grid(&tiles, per_row))
}

/// A fixed batch of `n` whole images (the first of the test data when there is one, else of the training data)
/// for reconstruction grids, normalized as the first view. `None` when the objective reconstructs nothing.
pub(super) fn recon_batch(cfg: &Config, train: &dyn Source, device: Device, n: usize) -> Option<Tensor> {
    if !cfg.objective.reconstructs() {
        return None;
    }
    let test = cfg.data.test.as_ref().and_then(|p| source::open_with(p, cfg.data.open_options()).ok());
    let src: &dyn Source = test.as_deref().unwrap_or(train);
    let first = src.get(0).ok()?.image;
    let view = cfg.view_recipes().swap_remove(0);
    let pipe = crate::eval::eval_recipe(&view, first.width, first.height).build(src.channels()).ok()?;
    let views = Views::new(vec![pipe]);
    let indices: Vec<usize> = (0..n.min(src.len())).collect();
    let job = crate::loader::BatchJob { indices: &indices, seed: cfg.seed, epoch: 0, reuse: None };
    let batch = crate::loader::build_batch(src, &views, job, &Default::default());
    (!batch.is_empty()).then(|| to_device(&batch, device).swap_remove(0))
}

/// Logs original / masked / reconstructed images (one row each) for masked-image objectives. The masks come
/// from a fixed seed, so grids from different epochs show the same patches hidden.
pub(super) fn log_reconstruction(
    objective: &mut dyn Objective,
    x: Option<&Tensor>,
    cfg: &Config,
    sink: &mut dyn Sink,
    step: i64,
) {
    let Some(x) = x else { return };
    tch::manual_seed(step_seed(cfg.seed, u64::MAX));
    let Some((masked, recon)) = objective.reconstruct(x) else { return };
    let view = &cfg.view_recipes()[0];
    let mut tiles = Vec::new();
    for t in [x, &masked, &recon] {
        for img in images_from_tensor(t, &view.mean, &view.std) {
            let factor = (56 / img.width.max(1)).max(1);
            tiles.push(upscale(&img, factor));
        }
    }
    let cols = x.size()[0] as usize;
    sink.image("reconstruction/original_masked_reconstructed", step, &grid(&tiles, cols));
    sink.flush();
}
