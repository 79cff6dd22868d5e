//! The one error type of the crate. Parameters are validated in constructors, so applying a
//! transform never fails; errors only come from building ops, recipes and images.

/// Why an op, recipe or image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    /// A parameter is out of its domain; `field` names it as it appears in the config
    /// (e.g. `jitter.p`) so the message points at the line to fix.
    #[error("{field} {message}")]
    InvalidParam { field: String, message: String },
    /// Pixel buffer and declared shape disagree, or the channel count is unsupported.
    #[error("bad image: {message}")]
    BadImage { message: String },
}

impl AugmentError {
    pub(crate) fn param(field: &str, message: impl Into<String>) -> AugmentError {
        AugmentError::InvalidParam { field: field.to_string(), message: message.into() }
    }
}

/// `Ok` when `p` is a probability; the error names `field`.
pub(crate) fn check_prob(field: &str, p: f32) -> Result<(), AugmentError> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(AugmentError::param(field, format!("must be in [0,1], got {p}")))
    }
}

/// `Ok` when `(lo, hi)` is an ordered range of finite numbers with `lo > min_exclusive`.
pub(crate) fn check_range(field: &str, (lo, hi): (f32, f32), min_exclusive: f32) -> Result<(), AugmentError> {
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(AugmentError::param(field, format!("must be finite, got ({lo}, {hi})")));
    }
    if lo <= min_exclusive {
        return Err(AugmentError::param(field, format!("lower bound must be > {min_exclusive}, got ({lo}, {hi})")));
    }
    if lo > hi {
        return Err(AugmentError::param(field, format!("must have lo <= hi, got ({lo}, {hi})")));
    }
    Ok(())
}
