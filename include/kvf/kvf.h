/*
 * kvf/kvf.h - the umbrella header of libkvf, kvfabric's client and connector library.
 *
 * kvfabric is a distributed KV-cache layer for prefill/decode-disaggregated LLM serving. This
 * header includes every public header of the library; each of them opens with a paragraph on what
 * its module is.
 */
#ifndef KVF_KVF_H
#define KVF_KVF_H

#include "kvf/export.h"
#include "kvf/error.h"
#include "kvf/layout.h"
#include "kvf/codec.h"
#include "kvf/object.h"
#include "kvf/client.h"
#include "kvf/connector.h"
#include "kvf/feasibility.h"
#include "kvf/telemetry.h"
#include "kvf/cuda.h"

#define KVF_VERSION_MAJOR  0
#define KVF_VERSION_MINOR  1
#define KVF_VERSION_PATCH  0
#define KVF_VERSION_STRING "0.1.0"

#endif
