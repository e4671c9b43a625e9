//! Without the `cuda` feature no transfer touches GPU memory: staging cannot exist.

use crate::error::Result;
use crate::xfer::Seg;

/// Never constructed without the `cuda` feature.
pub(crate) enum Staging {}

impl Staging {
    pub fn seg(&self) -> Seg {
        match *self {}
    }

    pub fn gather(&self) -> Result<()> {
        match *self {}
    }

    pub fn scatter(&self) -> Result<()> {
        match *self {}
    }
}
