//! An error and its causes on one line, for the failures of reaching a peer over TLS: tonic's
//! and rustls's errors say little on their own, and the useful part is several sources deep.

/// `error: cause: deeper cause`, each cause once: hyper and tonic often repeat a cause's text
/// inside its wrapper's, so a cause whose text is already on the line is not added again.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn every_cause_once() {
        let error = Layer(
            "transport error",
            Some(Box::new(Layer(
                "tls handshake: invalid peer certificate: UnknownIssuer",
                Some(Box::new(Layer(
                    "invalid peer certificate: UnknownIssuer",
                    None,
                ))),
            ))),
        );
        assert_eq!(
            error_chain(&error),
            "transport error: tls handshake: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
