"""The sigver wire codec: one protobuf ``Message`` per binary WebSocket frame.

The schema is ``questsig/sigver/sigver.proto`` (the README's), built here with sigver 18's
``isError = 3`` and ``isEnd = 4`` beside ``data`` in a oneof of ``Content``: the one schema that
reads both generations' ends. A decoder built from the .proto alone skips those two fields and
sees a content without data, which is an end there too.
"""
from __future__ import annotations

import enum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

__all__ = ["Message", "Content", "DecodeError", "Ending", "ending", "content_frame",
           "end_frame", "decode", "IS_FIRST", "NOT_FIRST", "HEARTBEAT"]


def _schema() -> descriptor_pb2.FileDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(
        name="questsig/sigver_wire.proto", package="questsig.sigver", syntax="proto3")
    message = schema.message_type.add(name="Message")
    message.oneof_decl.add(name="type")
    message.field.add(name="content", number=1, label=field.LABEL_OPTIONAL,
                      type=field.TYPE_MESSAGE, type_name=".questsig.sigver.Content",
                      oneof_index=0, json_name="content")
    for number, name in ((2, "isFirst"), (3, "stable"), (4, "heartbeat"), (5, "tryAnother")):
        message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_BOOL, oneof_index=0, json_name=name)
    content = schema.message_type.add(name="Content")
    content.oneof_decl.add(name="type")
    content.field.add(name="id", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_UINT32,
                      json_name="id")
    content.field.add(name="data", number=2, label=field.LABEL_OPTIONAL, type=field.TYPE_BYTES,
                      oneof_index=0, json_name="data")
    for number, name in ((3, "isError"), (4, "isEnd")):
        content.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_BOOL, oneof_index=0, json_name=name)
    return schema


# a pool of our own, so that another copy of the schema (the tests compile one) cannot clash
_pool = descriptor_pool.DescriptorPool()
_pool.Add(_schema())
Message: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("questsig.sigver.Message"))
Content: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("questsig.sigver.Content"))


class Ending(enum.Enum):
    """What a content means for its direction of a binding."""

    DATA = "data"
    END = "isEnd"    # this direction is over
    ERROR = "isError"  # the whole binding is over


def ending(content: Any) -> Ending:
    """Sigver 18's ends, and a content without data (the README's end), all count."""
    which = content.WhichOneof("type")
    if which == "isError":
        return Ending.ERROR
    if which == "data" and content.data:
        return Ending.DATA
    return Ending.END


def content_frame(routing_id: int, data: bytes) -> bytes:
    return Message(content=Content(id=routing_id, data=data)).SerializeToString()


def end_frame(routing_id: int, kind: Ending) -> bytes:
    """An end as sigver 18 sent it; README decoders skip the flag and see no data: an end."""
    flag = {"isError": True} if kind is Ending.ERROR else {"isEnd": True}
    return Message(content=Content(id=routing_id, **flag)).SerializeToString()


IS_FIRST = Message(isFirst=True).SerializeToString()        # 10 01
NOT_FIRST = Message(isFirst=False).SerializeToString()      # 10 00: oneof members always go out
HEARTBEAT = Message(heartbeat=True).SerializeToString()     # 20 01


def decode(payload: bytes) -> Any:
    """One frame's ``Message``; raises ``DecodeError`` for bytes that are not one."""
    return Message.FromString(payload)
