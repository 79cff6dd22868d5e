//! Whether a data set fits the model that will see it, checked when it is opened, before any work its failure
//! would waste: the channels the network takes, and labels inside the classes the report and the classifier
//! know. A set that does not fit is an error naming its config key and file, never a LibTorch shape panic
//! after hours of training.

use std::path::Path;

use super::{DataError, Source};

/// The classes a labeled set's labels must fall in: how many, and where that number comes from (for the message:
/// "the 10 names of data.class_names", "data.train's labels 0..9").
#[derive(Clone, Debug)]
pub struct Classes {
    pub count: usize,
    pub from: String,
}

impl Classes {
    /// The classes `names` name (none when empty).
    pub fn named(names: &[String], key: &str) -> Option<Classes> {
        (!names.is_empty()).then(|| Classes { count: names.len(), from: format!("the {} names of {key}", names.len()) })
    }

    /// The classes of labeled set `src` (opened from `key`): `0..max label`.
    pub fn of(src: &dyn Source, key: &str) -> Option<Classes> {
        let count = src.num_classes()?;
        Some(Classes { count, from: format!("{key}'s labels 0..{}", count.saturating_sub(1)) })
    }
}

/// Checks `src`, opened from config key `key` at `path`, against a network taking `channels` channels and, with
/// `classes`, labels in `0..classes.count` (a label outside would be a NaN row in a report, or an index error
/// inside the loss).
pub fn check_fits(
    src: &dyn Source,
    key: &str,
    path: &Path,
    channels: u8,
    classes: Option<&Classes>,
) -> Result<(), DataError> {
    let invalid = |message: String| DataError::Invalid { path: path.to_path_buf(), message };
    if src.channels() != channels {
        return Err(invalid(format!(
            "{key}: {}-channel images, but the network takes {channels} channel(s) (it was built for the training \
             data{}); use data of the same kind, or re-pack it with `selfsup pack --channels {channels}`",
            src.channels(),
            if channels == 3 { ": RGB" } else { ": gray" },
        )));
    }
    if let (Some(labels), Some(c)) = (src.labels(), classes) {
        if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= c.count) {
            let n = labels.iter().filter(|&&l| l < 0 || l as usize >= c.count).count();
            return Err(invalid(format!(
                "{key}: label {bad} (sample {}; {n} sample(s) in all) is outside 0..{} ({}); labels are class \
                 indices into the same classes",
                src.describe(i),
                c.count.saturating_sub(1),
                c.from
            )));
        }
    }
    Ok(())
}
