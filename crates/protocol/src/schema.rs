//! OpenAPI schemas (utoipa) for the types whose JSON is not their Rust shape: the validated
//! names (strings with a grammar) and `message` frames (written by hand, `type` first).

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::names::{CHANNEL_MAX_LEN, Channel, ID_MAX_LEN, MessageId, RequestId};
use crate::server::MessageFrame;

fn name_schema(pattern: String, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

impl PartialSchema for Channel {
    fn schema() -> RefOr<Schema> {
        name_schema(
            format!("^[A-Za-z0-9_.-]{{1,{CHANNEL_MAX_LEN}}}$"),
            "A channel name",
        )
    }
}
impl ToSchema for Channel {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Channel")
    }
}

impl PartialSchema for RequestId {
    fn schema() -> RefOr<Schema> {
        name_schema(
            format!("^[A-Za-z0-9_.:-]{{1,{ID_MAX_LEN}}}$"),
            "A request id: with the channel, the stream key",
        )
    }
}
impl ToSchema for RequestId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RequestId")
    }
}

impl PartialSchema for MessageId {
    fn schema() -> RefOr<Schema> {
        name_schema(
            format!("^[A-Za-z0-9_.:-]{{1,{ID_MAX_LEN}}}$"),
            "A message id: the idempotency key within a stream",
        )
    }
}
impl ToSchema for MessageId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MessageId")
    }
}

fn integer(min: i64, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(min))
        .description(Some(description))
}

impl PartialSchema for MessageFrame {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "One published message, the same object in live delivery, backlog drains and recovery",
            ))
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["message"])),
            )
            .property(
                "sequence_number",
                integer(1, "Deployment-wide sequence number"),
            )
            .property("stream_sequence", integer(1, "Position in its stream"))
            .property("channel", Channel::name_ref())
            .property("request_id", RequestId::name_ref())
            .property("message_id", MessageId::name_ref())
            .property(
                "timestamp",
                integer(0, "Milliseconds since the Unix epoch, when persisted"),
            )
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(SchemaType::AnyValue)
                    .description(Some("The published JSON, verbatim")),
            )
            .required("type")
            .required("sequence_number")
            .required("stream_sequence")
            .required("channel")
            .required("request_id")
            .required("message_id")
            .required("timestamp")
            .required("data")
            .into()
    }
}
impl ToSchema for MessageFrame {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MessageFrame")
    }
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        for (name, schema) in [
            ("Channel", Channel::schema()),
            ("RequestId", RequestId::schema()),
            ("MessageId", MessageId::schema()),
        ] {
            schemas.push((name.to_owned(), schema));
        }
    }
}

/// A `$ref` to a named schema.
trait NameRef: ToSchema {
    fn name_ref() -> RefOr<Schema> {
        RefOr::Ref(utoipa::openapi::Ref::from_schema_name(Self::name()))
    }
}
impl<T: ToSchema> NameRef for T {}
