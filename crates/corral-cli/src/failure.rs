//! How a verb fails, mapped to the exit statuses scripts rely on.

use std::process::ExitCode;

use corral::control::ClientError;

/// Why a verb did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Exit 1: the operation ran and failed (a reload rolled back, ...).
    Failed(String),
    /// Exit 2: the command line was wrong, or there is no such cluster.
    Usage(String),
}

impl Failure {
    pub(crate) fn report(self) -> ExitCode {
        let (message, code) = match self {
            Failure::Failed(message) => (message, 1),
            Failure::Usage(message) => (message, 2),
        };
        eprintln!("corral: {message}");
        ExitCode::from(code)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Failed(message) | Failure::Usage(message) => f.write_str(message),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        match err {
            // No cluster to talk to, as far as this user is concerned.
            ClientError::NotRunning { .. } | ClientError::Refused { .. } => {
                Failure::Usage(err.to_string())
            }
            other => Failure::Failed(other.to_string()),
        }
    }
}
