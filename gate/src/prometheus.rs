//! A minimal client of Prometheus' instant-query API over plain HTTP/1.

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The largest answer read from Prometheus; a gate's query returns a handful of series.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// A Prometheus server: `http://host:port` with an optional path prefix (`--web.route-prefix`).
#[derive(Debug, Clone)]
pub struct Prometheus {
    url: String,
    /// `host:port`, what the TCP connection dials and the Host header says.
    authority: String,
    /// The path before `/api/v1/query`, without a trailing slash.
    prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("`{url}` is not a URL: {why}")]
    Invalid { url: String, why: String },
    #[error("`{url}`: only http:// Prometheus URLs are supported")]
    Scheme { url: String },
    #[error("`{url}` has no host")]
    NoHost { url: String },
    #[error("`{url}`: a Prometheus URL takes no query or fragment")]
    Query { url: String },
}

/// Why a query gave no value. Every one of them fails the gate.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach Prometheus at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP to Prometheus at {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Prometheus answered HTTP {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("Prometheus refused the query ({error_type}): {error}")]
    Query { error_type: String, error: String },
    #[error("cannot read Prometheus' answer: {0}")]
    Answer(String),
}

impl Prometheus {
    /// Check `url` (`http://127.0.0.1:9090`, `http://prom:9090/prefix`).
    pub fn new(url: &str) -> Result<Self, UrlError> {
        let uri: Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| UrlError::Invalid {
                    url: url.to_string(),
                    why: e.to_string(),
                })?;
        if uri.scheme_str() != Some("http") {
            return Err(UrlError::Scheme {
                url: url.to_string(),
            });
        }
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return Err(UrlError::NoHost {
                url: url.to_string(),
            });
        };
        if uri.query().is_some() || url.contains('#') {
            return Err(UrlError::Query {
                url: url.to_string(),
            });
        }
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            authority: format!("{host}:{port}"),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The URL as configured (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Run `promql` as an instant query; the value of each series (a scalar is one).
    pub async fn query(&self, promql: &str) -> Result<Vec<f64>, QueryError> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|source| QueryError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let http = |source| QueryError::Http {
            url: self.url.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection lives as long as this one request.
        let connection = tokio::spawn(connection);
        let path = format!(
            "{}/api/v1/query?query={}",
            self.prefix,
            percent_encode(promql)
        );
        let request = Request::get(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| QueryError::Answer(format!("cannot build the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| QueryError::Answer(e.to_string()))?
            .to_bytes();
        connection.abort();
        decode(status, &body)
    }
}

/// What Prometheus answered: `{"status":"success","data":{"resultType":…,"result":…}}` or
/// `{"status":"error","errorType":…,"error":…}` (with HTTP 400/422/503).
fn decode(status: StatusCode, body: &[u8]) -> Result<Vec<f64>, QueryError> {
    let json: Value = match serde_json::from_slice(body) {
        Ok(json) => json,
        Err(_) if !status.is_success() => {
            return Err(QueryError::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        Err(e) => return Err(QueryError::Answer(format!("not JSON: {e}"))),
    };
    if json["status"] == "error" {
        return Err(QueryError::Query {
            error_type: json["errorType"].as_str().unwrap_or("error").to_string(),
            error: json["error"].as_str().unwrap_or("no message").to_string(),
        });
    }
    if !status.is_success() || json["status"] != "success" {
        return Err(QueryError::Status {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        });
    }
    let data = &json["data"];
    let result = &data["result"];
    match data["resultType"].as_str() {
        Some("vector") => result
            .as_array()
            .ok_or_else(|| QueryError::Answer("a vector without a result list".to_string()))?
            .iter()
            .map(|series| sample_value(&series["value"]))
            .collect(),
        Some("scalar") => Ok(vec![sample_value(result)?]),
        Some(other) => Err(QueryError::Answer(format!(
            "the query gives a {other}, not a number: write an instant vector or scalar expression"
        ))),
        None => Err(QueryError::Answer("no resultType".to_string())),
    }
}

/// `[<unix time>, "<value>"]`; the value may be `NaN`, `+Inf`, `-Inf`.
fn sample_value(sample: &Value) -> Result<f64, QueryError> {
    let text = sample[1].as_str().ok_or_else(|| {
        QueryError::Answer(format!("a sample that is not [time, value]: {sample}"))
    })?;
    text.parse::<f64>()
        .map_err(|_| QueryError::Answer(format!("the sample value `{text}` is not a number")))
}

/// Percent-encode everything but RFC 3986's unreserved characters (a query string value).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let p = Prometheus::new("http://127.0.0.1:9090/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (p.authority.as_str(), p.prefix.as_str()),
            ("127.0.0.1:9090", "")
        );
        let p = Prometheus::new("http://prom/x/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.authority.as_str(), p.prefix.as_str()), ("prom:80", "/x"));
        assert!(matches!(
            Prometheus::new("https://prom:9090"),
            Err(UrlError::Scheme { .. })
        ));
        assert!(Prometheus::new("not a url").is_err());
        assert!(matches!(
            Prometheus::new("http://prom:9090/?a=b"),
            Err(UrlError::Query { .. })
        ));
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("rate(errors_total{node=\"a b\"}[5s]) < 0.5"),
            "rate%28errors_total%7Bnode%3D%22a%20b%22%7D%5B5s%5D%29%20%3C%200.5"
        );
    }

    #[test]
    fn answers_decode_and_errors_say_what_prometheus_said() {
        let ok = StatusCode::OK;
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"0.25"]},{"metric":{"a":"b"},"value":[1.5,"NaN"]}]}}"#;
        let values = decode(ok, vector).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(values[0], 0.25);
        assert!(values[1].is_nan());
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"3"]}}"#;
        assert_eq!(
            decode(ok, scalar).unwrap_or_else(|e| panic!("{e}")),
            vec![3.0]
        );
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let message = decode(StatusCode::BAD_REQUEST, error)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            message,
            "Prometheus refused the query (bad_data): parse error at char 5"
        );
        let message = decode(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("Prometheus answered HTTP 502"),
            "{message}"
        );
        let string = br#"{"status":"success","data":{"resultType":"string","result":[1,"x"]}}"#;
        assert!(decode(ok, string).is_err());
    }
}
