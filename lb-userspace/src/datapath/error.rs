//! The datapath's errors: each failed step says what it was doing (`Context`), over the
//! kernel's or aya's error as its source.

use std::fmt::Display;

/// An error of the datapath module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Errno(#[from] nix::errno::Errno),
    /// Loading the BPF object.
    #[error(transparent)]
    Load(#[from] aya::EbpfError),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    #[error(transparent)]
    ServiceMap(#[from] lb_control::maps::MapError),
    /// The datapath refuses to go on (a pin folder of another layout, a path that is not a
    /// cgroup, a clock that does not calibrate, ...).
    #[error("{0}")]
    Refused(String),
    /// What was being done when `source` happened.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

/// A datapath result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Says what a failed step was doing, as `anyhow::Context` does, keeping the error typed.
pub trait Context<T> {
    fn context<C: Display>(self, what: C) -> Result<T>;
    fn with_context<C: Display, F: FnOnce() -> C>(self, what: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, what: C) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what.to_string(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, what: F) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, what: C) -> Result<T> {
        self.ok_or_else(|| Error::Refused(what.to_string()))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, what: F) -> Result<T> {
        self.ok_or_else(|| Error::Refused(what().to_string()))
    }
}

/// Returns a `Refused` error, formatted.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err($crate::datapath::error::Error::Refused(format!($($arg)*)))
    };
}
pub(crate) use refuse;
