//! An error and its causes as one line, for the commands' last word.

use std::error::Error;

/// An error and its causes, outermost first, joined by `: `. A cause whose
/// text the message before it already ends with (an error that shows its
/// source in its own text) is said once.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(current) = cause {
        let text = current.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = current.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("create directory /st: {source}")]
    struct ShowsItsSource {
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("opening the store")]
    struct Outer {
        #[source]
        source: ShowsItsSource,
    }

    #[test]
    fn a_cause_the_message_already_shows_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let said = io.to_string();
        let err = Outer {
            source: ShowsItsSource { source: io },
        };
        assert_eq!(
            error_chain(&err),
            format!("opening the store: create directory /st: {said}")
        );
    }

    #[test]
    fn a_lone_error_is_its_text() {
        let io = std::io::Error::other("disk on fire");
        assert_eq!(error_chain(&io), "disk on fire");
    }
}
