//! The API's contract on a real daemon: its OpenAPI document (`GET /v1/openapi.json`) lists
//! exactly the routes the daemon answers and those docs/api.md describes, and every error,
//! whoever finds it (a handler, the body or query parsing, the router), is `{"error": "..."}`
//! with the right status.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use forkd_tests::Daemon;
use serde_json::{json, Value};

/// What the router answers for a path it does not know.
const FALLBACK: &str = "no such API endpoint (see docs/api.md)";

/// Methods probed on every documented path (HEAD follows GET in axum, OPTIONS is not served).
const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

/// One raw answer: status, `Allow` header, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    allow: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// The `error` line of a JSON error body; panics (with the body) when it is anything else.
    fn error(&self, what: &str) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{what}: HTTP {} body is not JSON ({e}): {:?}", self.status, String::from_utf8_lossy(&self.body))
        });
        let obj = v.as_object().unwrap_or_else(|| panic!("{what}: not an object: {v}"));
        assert_eq!(obj.len(), 1, "{what}: the error body has only `error`: {v}");
        let line = v["error"].as_str().unwrap_or_else(|| panic!("{what}: no error text: {v}")).to_string();
        assert!(!line.is_empty() && !line.contains('\n'), "{what}: not one line: {line:?}");
        line
    }
}

/// Send a request with exactly these headers and body (none added, not even a content type).
fn send(d: &Daemon, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Answer {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut req = agent.request(method, &format!("{}{path}", d.url()));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let (status, allow) = (resp.status(), resp.header("Allow").map(str::to_string));
    let mut body = Vec::new();
    resp.into_reader().take(64 << 20).read_to_end(&mut body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Answer { status, allow, body }
}

/// `/v1/volumes/{name}/data` and `/v1/volumes/{ref}/data?offset=O` both become
/// `/v1/volumes/{}/data`.
fn normalize(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

/// Every (METHOD, path) of the document, paths normalized.
fn document_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().expect("a path item").keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), normalize(path)));
            }
        }
    }
    routes
}

/// Every `METHOD /path` docs/api.md names in backticks (its tables' first column, and prose).
fn docs_routes() -> BTreeSet<(String, String)> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut routes = BTreeSet::new();
    for span in text.split('`').skip(1).step_by(2) {
        let Some((method, path)) = span.split_once(' ') else { continue };
        if METHODS.contains(&method) && path.starts_with('/') {
            routes.insert((method.to_string(), normalize(path)));
        }
    }
    routes
}

/// A concrete path for a template: every parameter a name nothing has.
fn concrete(template: &str) -> String {
    template.replace("{}", "no-such-volume")
}

#[test]
fn the_document_lists_exactly_the_routes_served_and_documented() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let r = send(&d, "GET", "/v1/openapi.json", &[], None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let doc: Value = serde_json::from_slice(&r.body).expect("the document is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "not OpenAPI 3: {}", doc["openapi"]);

    let documented = document_routes(&doc);
    let described = docs_routes();
    assert_eq!(
        documented,
        described,
        "the OpenAPI document and docs/api.md disagree\nonly in the document: {:?}\nonly in docs/api.md: {:?}",
        documented.difference(&described).collect::<Vec<_>>(),
        described.difference(&documented).collect::<Vec<_>>()
    );
    assert!(documented.contains(&("GET".into(), "/v1/openapi.json".into())), "{documented:?}");

    // Every documented route is served: its answer is neither 405 nor the not-found fallback.
    for (method, template) in &documented {
        let path = concrete(template);
        let r = send(&d, method, &path, &[], None);
        assert_ne!(r.status, 405, "{method} {path} is documented but not served");
        if !(200..300).contains(&r.status) {
            let e = r.error(&format!("{method} {path}"));
            assert_ne!(e, FALLBACK, "{method} {path} is documented but not served");
        }
    }
    // On every documented path, every method the document does not list is refused with 405
    // (so the router serves nothing there that the document lacks), in the JSON shape.
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for template in paths {
        let path = concrete(template);
        for method in METHODS {
            if documented.contains(&(method.to_string(), template.clone())) {
                continue;
            }
            let r = send(&d, method, &path, &[], None);
            assert_eq!(
                r.status,
                405,
                "{method} {path}: served but not documented? {}",
                String::from_utf8_lossy(&r.body)
            );
            let e = r.error(&format!("{method} {path}"));
            let allow = r.allow.unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
            assert!(e.contains(method), "{method} {path}: {e}");
            for m in allow.split(',').map(str::trim).filter(|m| *m != "HEAD") {
                assert!(documented.contains(&(m.to_string(), template.clone())), "{path} allows {m}, undocumented");
            }
        }
    }
    // Every schema the document refers to is in it.
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "dangling schema reference {name}");
    }
    assert_eq!(doc["components"]["schemas"]["Volume"]["properties"]["origin"]["type"], json!(["string", "null"]));
}

/// A request that must fail: (method, path, headers, body, status, a word the error must
/// contain).
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Option<&'a [u8]>, u16, &'a str);

#[test]
fn every_error_is_one_json_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let json_type = [("Content-Type", "application/json")];
    let create = br#"{"name": "prod", "size": "1M"}"#;

    // A JSON body without a Content-Type is JSON; with a JSON type too.
    let r = send(&d, "POST", "/v1/sources", &[], Some(create));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = send(
        &d,
        "POST",
        "/v1/volumes/prod/snapshots",
        &[("Content-Type", "application/json; charset=utf-8")],
        Some(b"{}"),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = send(&d, "POST", "/v1/volumes/prod/snapshots", &[], None);
    assert_eq!(r.status, 201, "a snapshot needs no body: {}", String::from_utf8_lossy(&r.body));

    let big = format!("{{\"name\": \"x\", \"size\": 4096{}}}", " ".repeat(2 << 20));
    let too_big = "x".repeat((64 << 20) + 1);
    let cases: Vec<Case<'_>> = vec![
        ("POST", "/v1/sources", json_type.to_vec(), Some(b"{\"name\": "), 400, "not valid JSON"),
        ("POST", "/v1/sources", json_type.to_vec(), Some(b"[1, 2]"), 422, "does not fit"),
        ("POST", "/v1/sources", json_type.to_vec(), Some(b"{\"name\": \"x\"}"), 422, "size"),
        ("POST", "/v1/sources", vec![], Some(b"{\"name\": 7, \"size\": 4096}"), 422, "name"),
        ("POST", "/v1/sources", vec![("Content-Type", "text/plain")], Some(create), 415, "Content-Type"),
        ("POST", "/v1/clones", vec![("Content-Type", "application/x-www-form-urlencoded")], Some(b"a=b"), 415, "JSON"),
        ("POST", "/v1/sources", json_type.to_vec(), None, 400, "JSON body"),
        ("POST", "/v1/sources", vec![], Some(big.as_bytes()), 413, "2.0 MiB"),
        ("PUT", "/v1/volumes/prod/data?offset=0", vec![], Some(too_big.as_bytes()), 413, "64.0 MiB"),
        ("GET", "/v1/volumes/prod/data?offset=abc&length=1", vec![], None, 400, "query"),
        ("GET", "/v1/volumes/%FF", vec![], None, 400, "path"),
        ("PATCH", "/v1/volumes/prod", vec![], None, 405, "PATCH"),
        ("DELETE", "/v1/tree", vec![], None, 405, "GET"),
        ("GET", "/v2/nothing", vec![], None, 404, "no such API endpoint"),
        ("GET", "/v1/volumes/nope", vec![], None, 404, "nope"),
        ("POST", "/v1/sources", vec![], Some(b"{\"name\": \"big\", \"size\": \"2048T\"}"), 400, "1P (1 PiB)"),
    ];
    for (method, path, headers, body, status, word) in cases {
        let what = format!("{method} {path} {headers:?}");
        let r = send(&d, method, path, &headers, body);
        assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
        let e = r.error(&what);
        assert!(e.contains(word), "{what}: the error lacks `{word}`: {e}");
    }
    // Nothing above changed the catalog.
    let list = d.cli_json(&["list"]);
    assert_eq!(list["volumes"].as_array().map(Vec::len), Some(1), "{list}");

    // The CLI names the size limit rather than the alignment.
    let out = d.cli(&["source", "create", "huge", "--size", "2048T"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 1P (1 PiB)") && !err.contains("multiple of 4096"), "{err}");
}

#[test]
fn the_document_needs_the_token_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let file = tmp.path().join("token");
    std::fs::write(&file, token).expect("write token");
    let d = Daemon::start_with(tmp.path(), "127.0.0.1", &["--token-file", file.to_str().expect("utf-8")]);
    let r = send(&d, "GET", "/v1/openapi.json", &[], None);
    assert_eq!(r.status, 401);
    r.error("GET /v1/openapi.json without the token");
    let bearer = format!("Bearer {token}");
    let r = send(&d, "GET", "/v1/openapi.json", &[("Authorization", &bearer)], None);
    assert_eq!(r.status, 200);
    // A wrong method still meets the token first.
    assert_eq!(send(&d, "PATCH", "/v1/openapi.json", &[], None).status, 401);
}
