//! The API as an OpenAPI 3 document, served at `GET /v1/openapi.json`.
//!
//! The document is not written by hand: each handler's `#[utoipa::path]` says its method,
//! path, parameters and bodies, the bodies' schemas come from the serde types in
//! [`crate::api`], and the router is built from the same handler list
//! ([`super::routes`]), so a route cannot be served without being in the document.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, ToSchema};

use super::ApiError;
use crate::api::data::{Extents, Written, Zeroed};
use crate::api::error::ErrorBody;
use crate::api::ingest::{IngestAnswer, ResizeAnswer};
use crate::api::scrub::{ScrubAnswer, ScrubFailure, ScrubStatus};
use crate::api::volumes::{
    CloneAnswer, Deleted, Exports, IngestSummary, Moved, Snapshot, SnapshotTaken, Tree, TreeSnapshot, TreeVolume,
    Volume, VolumeList,
};

/// What the document says before the routes add their paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "forkd",
        description = "Thin clones of block volumes, served over NBD and iSCSI. Every error is a non-2xx \
            status with `{\"error\": \"...\"}`. See docs/api.md."
    ),
    tags(
        (name = "volumes", description = "Catalog operations: durable when they return"),
        (name = "environments", description = "Groups of volumes snapshotted, cloned, rewound, refreshed and deleted as one"),
        (name = "data", description = "A volume's bytes"),
        (name = "ingest", description = "Feeding sources"),
        (name = "scrub", description = "Checking every stored block against its checksum"),
        (name = "hooks", description = "Hook scripts, masking and the clone_from policy"),
        (name = "replication", description = "Sending snapshots to another forkd, receiving them, promoting a replica"),
        (name = "meta", description = "Metrics and this document"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerToken)
)]
pub(super) struct ApiDoc;

/// The optional bearer token (docs/api.md, "Authentication").
#[derive(Debug)]
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Without a token (loopback only) nothing is asked; with one, every request needs it.
        doc.security =
            Some(vec![SecurityRequirement::default(), SecurityRequirement::new("token", Vec::<String>::new())]);
    }
}

/// The answers: the daemon always sends every field of them. Their types read leniently
/// (`#[serde(default)]`, see [`crate::api::volumes`]), which the generator takes to mean
/// "optional", so [`finish`] says otherwise.
fn answers() -> [Cow<'static, str>; 20] {
    [
        Volume::name(),
        Snapshot::name(),
        Exports::name(),
        IngestSummary::name(),
        VolumeList::name(),
        SnapshotTaken::name(),
        CloneAnswer::name(),
        Moved::name(),
        Deleted::name(),
        Tree::name(),
        TreeVolume::name(),
        TreeSnapshot::name(),
        Written::name(),
        Zeroed::name(),
        Extents::name(),
        IngestAnswer::name(),
        ResizeAnswer::name(),
        ScrubAnswer::name(),
        ScrubFailure::name(),
        ScrubStatus::name(),
    ]
}

/// The answers of the environment routes (see [`answers`]).
fn environment_answers() -> [Cow<'static, str>; 8] {
    use crate::api::environments as e;
    [
        e::Environment::name(),
        e::EnvSnapshot::name(),
        e::EnvironmentList::name(),
        e::EnvSnapshotTaken::name(),
        e::EnvCloned::name(),
        e::EnvMoved::name(),
        e::EnvDeleted::name(),
        e::TreeEnvironment::name(),
    ]
}

/// The fields of an answer that are absent by rule: a volume carries exactly one of the
/// first two, and `environment`, `retention` and `detached_from` only where set.
const SOMETIMES_ABSENT: [&str; 5] = ["snapshots", "snapshot_count", "environment", "retention", "detached_from"];

/// Complete the generated document: every field of an answer is required, and has no
/// default (the defaults are what a client assumes when a field is missing, not values the
/// daemon sends).
pub(super) fn finish(doc: &mut utoipa::openapi::OpenApi) {
    let Some(components) = doc.components.as_mut() else { return };
    for name in answers().into_iter().chain(environment_answers()) {
        if let Some(RefOr::T(schema)) = components.schemas.get_mut(name.as_ref()) {
            make_whole(schema);
        }
    }
}

fn make_whole(schema: &mut Schema) {
    match schema {
        Schema::Object(o) => {
            o.required = o.properties.keys().filter(|k| !SOMETIMES_ABSENT.contains(&k.as_str())).cloned().collect();
            o.properties.values_mut().for_each(drop_default);
        }
        Schema::AllOf(all) => {
            for item in &mut all.items {
                if let RefOr::T(s) = item {
                    make_whole(s);
                }
            }
        }
        _ => {}
    }
}

fn drop_default(property: &mut RefOr<Schema>) {
    match property {
        RefOr::T(Schema::Object(o)) => o.default = None,
        RefOr::T(Schema::OneOf(o)) => o.default = None,
        RefOr::T(Schema::AllOf(o)) => o.default = None,
        RefOr::T(Schema::Array(a)) => a.default = None,
        _ => {}
    }
}

/// The document as served: rendered once when the router is built.
#[derive(Debug, Clone)]
pub(super) struct Document(pub(super) Arc<Result<String, String>>);

impl Document {
    pub(super) fn render(doc: &utoipa::openapi::OpenApi) -> Document {
        Document(Arc::new(doc.to_json().map_err(|e| format!("cannot render the OpenAPI document: {e}"))))
    }
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "this document (OpenAPI 3)", content_type = "application/json")))]
pub(super) async fn document(Extension(doc): Extension<Document>) -> Response {
    match doc.0.as_ref() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text.clone()).into_response(),
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.clone()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_in_the_document_and_whole() {
        let doc = super::super::openapi_document();
        let schemas = &doc.components.as_ref().expect("components").schemas;
        for name in answers() {
            assert!(schemas.contains_key(name.as_ref()), "{name} is not in the document");
        }
        let Some(RefOr::T(Schema::Object(volume))) = schemas.get("Volume") else { panic!("no Volume object") };
        assert!(volume.required.iter().any(|f| f == "origin"), "{:?}", volume.required);
        assert!(!volume.required.iter().any(|f| f == "snapshots"), "{:?}", volume.required);
        let text = serde_json::to_string(&volume).expect("json");
        assert!(!text.contains("\"default\""), "answers carry no defaults: {text}");
        let Some(RefOr::T(Schema::Object(req))) = schemas.get("SnapshotRequest") else { panic!("no SnapshotRequest") };
        assert!(req.required.is_empty(), "requests keep their own rules: {:?}", req.required);
    }
}
