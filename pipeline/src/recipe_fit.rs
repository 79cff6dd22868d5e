//! Does the augmentation recipe fit the images? Checked once at the start of a run on a few samples, so that a
//! recipe made for other data (a 28 px gray Fashion-MNIST preset on a folder of 512 px colour photos) is said
//! before training instead of being found in the results.
//!
//! - Normalization: a `mean`/`std` with neither 0, 1 nor one value per channel of the images is an error (the
//!   config's own validation only knows the channels the config expects; an IDX file without `idx3` in its name,
//!   CIFAR or an HDF5 file decide their own). One value on 3-channel images other than 0.5 (the default) is a gray
//!   dataset's statistic applied to R, G and B alike: a warning that points at ImageNet's.
//! - Size: the largest view against the median shorter side of the sampled images. A view under 64 px of images
//!   more than 4x its size is a recipe for thumbnails (28 px MNIST, 32 px CIFAR) on photos: a crop keeps little of
//!   the photo's detail (a `*-photos*` preset fits). Views of 64 px and more are not warned about however large the
//!   photos (224 px views of 4000 px phone photos are the usual recipe; 96 px ones of 512 px photos a CPU's). A view
//!   more than twice the images' side only upscales.
//!
//! Gray views of colour images (`data.channels = 1` on RGB photos) are the user's choice and not warned about.

use selfsup_augment::{AugmentError, RecipeConfig};

use crate::source::Source;
use crate::{Config, Error};

/// At most this many samples are read, evenly spaced over the source (unreadable ones are skipped).
const SAMPLES: usize = 16;
/// Images whose shorter side is more than this many times the largest view lose most of their detail ...
const SHRINK_FACTOR: u32 = 4;
/// ... when the view is also smaller than this (larger views of large photos are the usual photo recipes).
const SMALL_VIEW: u32 = 64;
/// Images whose shorter side is less than the largest view divided by this are upscaled by every crop.
const UPSCALE_FACTOR: u32 = 2;
/// ImageNet's per-channel mean and std (torchvision's): the normalization of colour photos.
const IMAGENET_MEAN_STD: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

/// The warnings for `cfg`'s recipe on `source` (sentences for stderr at the start of the run, without a
/// `warning:` prefix; empty when the recipe fits), or an error where it cannot be right: a `mean`/`std` whose
/// length fits neither the images' channels nor all of them at once ([`Error::Augment`] naming the key).
pub fn check(cfg: &Config, source: &dyn Source) -> Result<Vec<String>, Error> {
    let channels = source.channels();
    let mut warnings = Vec::new();
    for (key, recipe) in recipes(cfg) {
        if let Some(w) = normalization(&key, recipe, channels)? {
            warnings.push(w);
        }
    }
    warnings.extend(size_fit(cfg, source));
    Ok(warnings)
}

/// The recipes to check, each with the key that sets it: `augment` alone, or every `[[views]]` table that differs
/// from `[augment]` in what is checked (a view that inherits its values is `[augment]`'s business, said once).
fn recipes(cfg: &Config) -> Vec<(String, &RecipeConfig)> {
    if cfg.views.is_empty() {
        return vec![("augment".to_string(), &cfg.augment)];
    }
    let inherits = |v: &RecipeConfig| v.mean == cfg.augment.mean && v.std == cfg.augment.std;
    let mut out = Vec::new();
    if cfg.views.iter().any(inherits) {
        out.push(("augment".to_string(), &cfg.augment));
    }
    out.extend(cfg.views.iter().enumerate().filter(|(_, v)| !inherits(v)).map(|(i, v)| (format!("views[{i}]"), v)));
    out
}

/// Rule (a): the normalization of recipe `key` on images of `channels` channels.
fn normalization(key: &str, recipe: &RecipeConfig, channels: u8) -> Result<Option<String>, Error> {
    let c = usize::from(channels);
    let mut single = Vec::new();
    for (field, values) in [("mean", &recipe.mean), ("std", &recipe.std)] {
        match values.len() {
            0 => {}
            1 if c == 3 && values[0] != 0.5 => single.push(format!("{key}.{field} = {values:?}")),
            1 => {}
            n if n == c => {}
            n => {
                return Err(Error::Augment(AugmentError::InvalidParam {
                    field: format!("{key}.{field}"),
                    message: if c == 1 {
                        format!("has {n} values, but the training images have 1 channel: give 1")
                    } else {
                        format!("has {n} values, but the training images have {c} channels: give {c} (one per channel) or 1 (for all)")
                    },
                }));
            }
        }
    }
    Ok((!single.is_empty()).then(|| {
        format!(
            "{} {} all 3 channels of the colour training images with one value: a gray dataset's statistic \
             (Fashion-MNIST's presets use [0.286] / [0.353]), not a colour one. For photos use ImageNet's: \
             {key}.mean = {:?}, {key}.std = {:?} (as the *-photos presets do)",
            single.join(" and "),
            if single.len() == 1 { "normalizes" } else { "normalize" },
            IMAGENET_MEAN_STD.0,
            IMAGENET_MEAN_STD.1
        )
    }))
}

/// Rule (b): the largest view against the images' median shorter side, `None` when it fits or no sample reads.
fn size_fit(cfg: &Config, source: &dyn Source) -> Option<String> {
    let n = source.len();
    let k = n.min(SAMPLES);
    let mut sides: Vec<u32> =
        (0..k).filter_map(|j| source.get(j * n / k).ok()).map(|s| s.image.width.min(s.image.height)).collect();
    if sides.is_empty() {
        return None;
    }
    sides.sort_unstable();
    let side = sides[sides.len() / 2];
    let (key, view) = largest_view(cfg);
    let sampled = format!("the median shorter side of {} sampled training images", sides.len());
    if side > SHRINK_FACTOR * view && view < SMALL_VIEW {
        Some(format!(
            "the views are much smaller than the images: crops of {side} px photos ({sampled}) are shrunk to {view} \
             px ({key} = {view}), so most of their detail is lost. For photos use a preset made for them \
             (`selfsup presets`: simclr-photos, byol-photos, dino-photos at 224 px, their -tiny twins at 96 px on a \
             CPU) or set {key}"
        ))
    } else if side * UPSCALE_FACTOR < view {
        Some(format!(
            "the views are much larger than the images: {side} px images ({sampled}) are upscaled to {view} px \
             views ({key} = {view}), which adds no detail and costs {:.0}x the compute. Set {key} near {side} (the \
             *-fmnist* presets are made for 28 px images; the *-photos* ones for photos of 224 px and more)",
            (f64::from(view) / f64::from(side)).powi(2)
        ))
    } else {
        None
    }
}

/// The largest view side and the key that sets it (`augment.size` when a view inherits it).
fn largest_view(cfg: &Config) -> (String, u32) {
    let recipes = cfg.view_recipes();
    let (i, size) = recipes.iter().map(|r| r.size).enumerate().max_by_key(|&(_, size)| size).unwrap_or((0, 0));
    let key = if cfg.views.is_empty() || size == cfg.augment.size {
        "augment.size".to_string()
    } else {
        format!("views[{i}].size")
    };
    (key, size)
}

#[cfg(test)]
mod tests {
    use selfsup_augment::Image;

    use super::*;
    use crate::source::{DataError, ImageFolder, Sample};

    /// Images in memory; `None` is a sample that cannot be read.
    struct Memory {
        images: Vec<Option<Image>>,
        channels: u8,
    }

    impl Memory {
        /// `n` readable images of `width x height` with `channels` channels.
        fn new(n: usize, width: u32, height: u32, channels: u8) -> Memory {
            let image = Image::new(width, height, channels, vec![128; (width * height) as usize * channels as usize]);
            Memory { images: vec![Some(image.unwrap()); n], channels }
        }
    }

    impl Source for Memory {
        fn len(&self) -> usize {
            self.images.len()
        }
        fn get(&self, index: usize) -> Result<Sample, DataError> {
            match &self.images[index] {
                Some(image) => Ok(Sample { image: image.clone(), label: None }),
                None => Err(DataError::Invalid { path: self.describe(index).into(), message: "unreadable".into() }),
            }
        }
        fn channels(&self) -> u8 {
            self.channels
        }
        fn describe(&self, index: usize) -> String {
            format!("memory#{index}")
        }
        fn num_classes(&self) -> Option<usize> {
            None
        }
        fn labels(&self) -> Option<Vec<i64>> {
            None
        }
    }

    /// A config with one recipe for every view: `size` px, normalized with `mean` / `std`.
    fn config(size: u32, mean: &[f32], std: &[f32]) -> Config {
        let mut cfg = Config::default();
        cfg.augment.size = size;
        cfg.augment.mean = mean.to_vec();
        cfg.augment.std = std.to_vec();
        cfg
    }

    const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    fn field_of(err: Error) -> String {
        match err {
            Error::Augment(AugmentError::InvalidParam { field, message }) => {
                assert!(message.contains("3 channels"), "{message}");
                field
            }
            other => panic!("expected an augment error naming the key, got {other}"),
        }
    }

    #[test]
    fn a_mean_or_std_of_the_wrong_length_is_an_error_naming_the_key() {
        let photos = Memory::new(4, 512, 384, 3);
        let err = check(&config(224, &[0.5, 0.5], &IMAGENET_STD), &photos).unwrap_err();
        assert_eq!(field_of(err), "augment.mean");
        // A view that sets its own std is named by its index; the views that inherit [augment]'s are fine.
        let mut cfg = config(224, &IMAGENET_MEAN, &IMAGENET_STD);
        cfg.views = vec![cfg.augment.clone(), RecipeConfig { std: vec![0.2, 0.2], ..cfg.augment.clone() }];
        assert_eq!(field_of(check(&cfg, &photos).unwrap_err()), "views[1].std");
        // One value per channel of gray images is 1: three are wrong there.
        let gray = Memory::new(4, 28, 28, 1);
        let err = check(&config(28, &IMAGENET_MEAN, &IMAGENET_STD), &gray).unwrap_err();
        assert!(
            err.to_string().starts_with("augment.mean has 3 values, but the training images have 1 channel:"),
            "{err}"
        );
    }

    #[test]
    fn a_gray_statistic_on_colour_images_is_a_warning_suggesting_imagenets() {
        let photos = Memory::new(20, 256, 256, 3);
        let warnings = check(&config(224, &[0.286], &[0.353]), &photos).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(w.contains("augment.mean = [0.286] and augment.std = [0.353]"), "{w}");
        assert!(w.contains("augment.mean = [0.485, 0.456, 0.406], augment.std = [0.229, 0.224, 0.225]"), "{w}");
        // Said once for the views that inherit it, not once per view.
        let mut cfg = config(224, &[0.286], &[0.353]);
        cfg.views = vec![cfg.augment.clone(), RecipeConfig { solarize_p: 0.2, ..cfg.augment.clone() }];
        assert_eq!(check(&cfg, &photos).unwrap(), warnings);
        // 0.5 (the neutral default) and no values at all are not a dataset's statistic.
        assert_eq!(check(&config(224, &[0.5], &[0.5]), &photos).unwrap(), Vec::<String>::new());
        assert_eq!(check(&config(224, &[], &[]), &photos).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn views_far_smaller_or_larger_than_the_images_are_warned_about_with_both_sizes() {
        // The Fashion-MNIST preset's 28 px views on 512 px photos.
        let photos = Memory::new(20, 512, 683, 3);
        let warnings = check(&config(28, &IMAGENET_MEAN, &IMAGENET_STD), &photos).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("crops of 512 px photos"), "{}", warnings[0]);
        assert!(warnings[0].contains("shrunk to 28 px (augment.size = 28)"), "{}", warnings[0]);
        assert!(warnings[0].contains("simclr-photos"), "{}", warnings[0]);
        // 224 px views on 28 px images: upscaled 8x, 64x the pixels.
        let small = Memory::new(20, 28, 28, 3);
        let warnings = check(&config(224, &IMAGENET_MEAN, &IMAGENET_STD), &small).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("28 px images") && warnings[0].contains("224 px views"), "{}", warnings[0]);
        assert!(warnings[0].contains("64x the compute"), "{}", warnings[0]);
        // Multi-crop: the largest view counts, named by its own key when it does not inherit augment.size.
        let mut cfg = config(28, &IMAGENET_MEAN, &IMAGENET_STD);
        cfg.views = vec![RecipeConfig { size: 48, ..cfg.augment.clone() }, cfg.augment.clone()];
        let warnings = check(&cfg, &photos).unwrap();
        assert!(warnings[0].contains("shrunk to 48 px (views[0].size = 48)"), "{warnings:?}");
    }

    #[test]
    fn a_fitting_recipe_is_silent() {
        // The photo presets' recipe on 512 px photos, and on photos only a little smaller than the views.
        let cfg = config(224, &IMAGENET_MEAN, &IMAGENET_STD);
        for (w, h) in [(512, 512), (640, 480), (150, 200), (2016, 1512)] {
            assert_eq!(check(&cfg, &Memory::new(5, w, h, 3)).unwrap(), Vec::<String>::new(), "{w}x{h}");
        }
        // The CPU twins' 96 px views of 512 px photos.
        let tiny = config(96, &IMAGENET_MEAN, &IMAGENET_STD);
        assert_eq!(check(&tiny, &Memory::new(20, 512, 512, 3)).unwrap(), Vec::<String>::new());
        // The Fashion-MNIST recipe on 28 px gray images.
        let gray = Memory::new(100, 28, 28, 1);
        assert_eq!(check(&config(28, &[0.286], &[0.353]), &gray).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn unreadable_samples_are_skipped_and_none_readable_says_nothing_of_sizes() {
        // Of the 16 samples read (0, 2, 5, 7, 10, 12, ...), 5 are multiples of 3.
        let mut photos = Memory::new(40, 512, 512, 3);
        for i in (0..40).step_by(3) {
            photos.images[i] = None;
        }
        let warnings = check(&config(28, &IMAGENET_MEAN, &IMAGENET_STD), &photos).unwrap();
        assert!(warnings[0].contains("of 11 sampled training images"), "{warnings:?}");
        photos.images.iter_mut().for_each(|i| *i = None);
        assert_eq!(check(&config(28, &IMAGENET_MEAN, &IMAGENET_STD), &photos).unwrap(), Vec::<String>::new());
        assert_eq!(check(&config(28, &[0.286], &[0.353]), &Memory::new(0, 1, 1, 3)).unwrap().len(), 1);
    }

    /// A real folder of RGB PNGs: read at its own size, in the channels `data.channels` asks for.
    #[test]
    fn an_image_folder_of_colour_pngs() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u8 {
            let png = image::RgbImage::from_fn(300, 400, |x, y| image::Rgb([i * 40, (x % 256) as u8, (y % 256) as u8]));
            png.save(dir.path().join(format!("{i}.png"))).unwrap();
        }
        let rgb = ImageFolder::open(dir.path(), 3).unwrap();
        let w = check(&config(28, &[0.286], &[0.353]), &rgb).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("gray dataset's statistic") && w[1].contains("crops of 300 px photos"), "{w:?}");
        assert_eq!(check(&config(224, &IMAGENET_MEAN, &IMAGENET_STD), &rgb).unwrap(), Vec::<String>::new());
        // Gray views of colour photos are the user's choice: with a fitting size, nothing to say.
        let gray = ImageFolder::open(dir.path(), 1).unwrap();
        assert_eq!(check(&config(224, &[0.45], &[0.25]), &gray).unwrap(), Vec::<String>::new());
    }
}
