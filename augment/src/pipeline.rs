//! [`Transform`], [`Pipeline`] (one view's recipe: ops in order, then normalize into the
//! caller's buffer) and [`Views`] (several recipes over one decoded sample: decode once, crop
//! N times, asymmetric views = different pipelines).

use std::cell::RefCell;

use crate::color::luma;
use crate::image::Image;
use crate::normalize::Normalize;
use crate::resize::{resize_crop_into, CropBox};
use crate::rng::Rng;

/// One augmentation op. Parameters are validated when the op is built, so applying cannot fail.
pub trait Transform: Send + Sync {
    /// Transforms `img` in place (its size may change).
    fn apply(&self, img: &mut Image, rng: &mut Rng);

    /// Writes the transformed `src` into `dst` (whose allocation is reused). The default copies
    /// then applies in place; ops that read every source pixel anyway (crops) override it to
    /// skip the copy of a large decoded image.
    fn apply_to(&self, src: &Image, dst: &mut Image, rng: &mut Rng) {
        dst.copy_from(src);
        self.apply(dst, rng);
    }
}

/// Per-thread working images, reused across calls so a warm pipeline allocates nothing.
#[derive(Default)]
struct Work {
    img: Option<Image>,
    spare: Option<Image>,
}

thread_local! {
    static WORK: RefCell<Work> = RefCell::new(Work::default());
}

fn empty_image() -> Image {
    Image { width: 0, height: 0, channels: 1, data: Vec::new() }
}

/// One view's recipe: transforms in order, then conversion to the output channel count and
/// size if the transforms did not already produce them, then normalization.
pub struct Pipeline {
    transforms: Vec<Box<dyn Transform>>,
    normalize: Normalize,
    out_channels: u8,
    out_size: (u32, u32),
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("transforms", &self.transforms.len())
            .field("normalize", &self.normalize)
            .field("out_shape", &self.out_shape())
            .finish()
    }
}

impl Pipeline {
    /// `out_size` is (width, height).
    ///
    /// # Panics
    /// If `out_channels` is not 1 or 3, a side of `out_size` is 0, or `normalize` has 3
    /// channels while `out_channels` is 1 (inconsistent wiring, a programming error;
    /// [`RecipeConfig::build`](crate::RecipeConfig::build) validates user input first).
    pub fn new(
        transforms: Vec<Box<dyn Transform>>,
        normalize: Normalize,
        out_channels: u8,
        out_size: (u32, u32),
    ) -> Pipeline {
        assert!(out_channels == 1 || out_channels == 3, "out_channels must be 1 or 3");
        assert!(out_size.0 > 0 && out_size.1 > 0, "out_size must be non-zero");
        assert!(
            normalize.channels() == 1 || normalize.channels() == out_channels as usize,
            "Normalize has {} channels but out_channels is {out_channels}",
            normalize.channels()
        );
        Pipeline { transforms, normalize, out_channels, out_size }
    }

    /// Number of floats one view occupies: channels * height * width.
    pub fn out_len(&self) -> usize {
        self.out_channels as usize * self.out_size.0 as usize * self.out_size.1 as usize
    }

    /// `[channels, height, width]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.out_channels as usize, self.out_size.1 as usize, self.out_size.0 as usize]
    }

    pub fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    /// Runs the transforms on `src` into `work`, then makes `work` match the output shape.
    fn augment(&self, src: &Image, rng: &mut Rng, work: &mut Image, spare: &mut Image) {
        match self.transforms.split_first() {
            Some((first, rest)) => {
                first.apply_to(src, work, rng);
                for t in rest {
                    t.apply(work, rng);
                }
            }
            None => work.copy_from(src),
        }
        convert_channels(work, self.out_channels);
        if (work.width, work.height) != self.out_size {
            resize_crop_into(work, CropBox::full(work), self.out_size.0, self.out_size.1, spare);
            std::mem::swap(work, spare);
        }
    }

    /// Applies the recipe to a copy of `src` and writes normalized CHW f32 into `out`.
    ///
    /// # Panics
    /// If `out.len() != self.out_len()`.
    pub fn run(&self, src: &Image, rng: &mut Rng, out: &mut [f32]) {
        assert_eq!(out.len(), self.out_len(), "Pipeline::run: output slice has wrong length");
        WORK.with(|cell| {
            // A transform that itself runs a pipeline would re-enter; give it fresh buffers.
            let Ok(mut guard) = cell.try_borrow_mut() else {
                let (mut work, mut spare) = (empty_image(), empty_image());
                self.augment(src, rng, &mut work, &mut spare);
                self.normalize.write_chw(&work, out);
                return;
            };
            let w = &mut *guard;
            let work = w.img.get_or_insert_with(empty_image);
            let spare = w.spare.get_or_insert_with(empty_image);
            self.augment(src, rng, work, spare);
            self.normalize.write_chw(work, out);
        });
    }

    /// Same as [`run`](Self::run) but returns the augmented u8 image (for previews).
    pub fn run_image(&self, src: &Image, rng: &mut Rng) -> Image {
        let (mut work, mut spare) = (empty_image(), empty_image());
        self.augment(src, rng, &mut work, &mut spare);
        work
    }
}

/// Gray → RGB by replication, RGB → gray by luma, in place.
fn convert_channels(img: &mut Image, channels: u8) {
    let n = img.pixels();
    match (img.channels, channels) {
        (1, 3) => {
            img.data.resize(n * 3, 0);
            // Back to front so no value is overwritten before it is read.
            for i in (0..n).rev() {
                let v = img.data[i];
                img.data[3 * i..3 * i + 3].fill(v);
            }
        }
        (3, 1) => {
            for i in 0..n {
                let p = &img.data[3 * i..3 * i + 3];
                img.data[i] = luma(p[0], p[1], p[2]);
            }
            img.data.truncate(n);
        }
        _ => return,
    }
    img.channels = channels;
}

/// Several views of one decoded sample.
#[derive(Debug)]
pub struct Views {
    pub recipes: Vec<Pipeline>,
}

impl Views {
    pub fn new(recipes: Vec<Pipeline>) -> Views {
        Views { recipes }
    }

    /// Runs recipe `i` into `outs[i]`, drawing from `rng` in order, so the views of a sample
    /// are reproducible from its (seed, epoch, index) stream.
    ///
    /// # Panics
    /// If `outs.len() != self.recipes.len()` or a slice has the wrong length.
    pub fn run(&self, src: &Image, rng: &mut Rng, outs: &mut [&mut [f32]]) {
        assert_eq!(outs.len(), self.recipes.len(), "Views::run: one output slice per recipe");
        for (recipe, out) in self.recipes.iter().zip(outs.iter_mut()) {
            recipe.run(src, rng, out);
        }
    }
}
