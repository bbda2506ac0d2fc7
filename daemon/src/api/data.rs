//! The data routes' bodies (docs/api.md, "Data"): the byte range a request names, and the
//! small answers of write, zero, flush and extents. The bytes themselves travel raw
//! (`application/octet-stream`). Field order and leniency follow [`crate::api::volumes`].

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// Raw bytes (`application/octet-stream`), as the document names the binary bodies: volume
/// data, digest lists, block-range lists and the ingest stream. Not a wire type itself.
#[derive(Debug, Clone, Copy)]
pub struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for Binary {}

/// The query naming a byte range: `?offset=O&length=L`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Range {
    /// First byte (default 0 where optional).
    pub offset: Option<u64>,
    /// Number of bytes.
    pub length: Option<u64>,
}

/// The answer of `PUT /v1/volumes/{name}/data`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Written {
    /// Bytes written.
    pub written: u64,
}

/// The answer of `POST /v1/volumes/{name}/zero`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Zeroed {
    /// Bytes zeroed.
    pub zeroed: u64,
}

/// `{}`: the answer of flush and of abandoning an ingest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Empty {}

/// The answer of `GET /v1/volumes/{ref}/extents`. Read strictly: `forkd dump` sizes its file
/// and fetches its data by these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Extents {
    /// The ranges holding data, `[offset, length]` in bytes, in order, adjacent ones merged;
    /// everything else reads as zeros.
    #[schema(value_type = Vec<Vec<u64>>)]
    pub extents: Vec<(u64, u64)>,
    /// The size of the volume or snapshot in bytes.
    pub size_bytes: u64,
}
