/* edgefl native device: the C API an Android (JNI) or iOS (Objective-C++) app embeds.
 *
 * A device joins a federation over MQTT (docs/PROTOCOL.md), trains the exported ExecuTorch
 * program's LoRA adapter on its own data, and sends compact updates. Functions returning int
 * give 0 on success and -1 on failure; edgefl_last_error() then holds a one-line reason (per
 * thread). Handles are not thread-safe, except edgefl_device_stop().
 */
#ifndef EDGEFL_DEVICE_H
#define EDGEFL_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define EDGEFL_API __attribute__((visibility("default")))
#else
#define EDGEFL_API
#endif

/* The last error of this thread, "" if none. */
EDGEFL_API const char* edgefl_last_error(void);
EDGEFL_API const char* edgefl_version(void);

/* Bytes owned by the library; release with edgefl_buffer_free. */
typedef struct {
  uint8_t* data;
  size_t size;
} edgefl_buffer;
EDGEFL_API void edgefl_buffer_free(edgefl_buffer* buffer);

/* ---- device ---------------------------------------------------------------------------- */
typedef struct {
  const char* device_id;        /* topic segment, e.g. "phone-1" */
  const char* federation;       /* topic segment */
  const char* artifact_dir;     /* exported artifacts: manifest.json, model.pte, ... */
  const char* host;             /* broker */
  int port;                     /* 1883, or 8883 with TLS */
  const char* state_dir;        /* last round, pending update, personal tensors; NULL: none */
  const char* ca_file;          /* TLS: CA certificate (PEM); NULL: plain MQTT */
  const char* cert_file;        /* TLS client certificate (PEM) */
  const char* key_file;         /* TLS client key (PEM) */
  const char* signing_key_file; /* Ed25519 key (PEM PKCS#8); NULL: unsigned updates */
  uint64_t seed;                /* batch order */
  int keepalive_s;              /* 0: 30 s */
} edgefl_device_config;

typedef struct edgefl_device edgefl_device;

/* Loads the artifacts and the key; NULL on failure (see edgefl_last_error). */
EDGEFL_API edgefl_device* edgefl_device_create(const edgefl_device_config* config);
/* The device's examples: a partition file (docs/DEVICES.md). */
EDGEFL_API int edgefl_device_load_data(edgefl_device* device, const char* partition_path);
/* Serves rounds until the final global or edgefl_device_stop(); returns the rounds trained,
 * or -1 on a fatal error (bad credentials, unusable artifacts). Reconnects by itself. */
EDGEFL_API int edgefl_device_run(edgefl_device* device);
/* Asks a running device to stop (any thread, e.g. the app's lifecycle callback). */
EDGEFL_API void edgefl_device_stop(edgefl_device* device);
EDGEFL_API void edgefl_device_destroy(edgefl_device* device);

/* ---- trainer: local training without a federation (and parity checks) ------------------- */
typedef struct edgefl_trainer edgefl_trainer;

EDGEFL_API edgefl_trainer* edgefl_trainer_create(const char* artifact_dir, double learning_rate);
EDGEFL_API void edgefl_trainer_destroy(edgefl_trainer* trainer);
/* Adapter tensors by canonical name, as a safetensors file in memory (F32). */
EDGEFL_API int edgefl_trainer_set_adapter(edgefl_trainer* trainer, const uint8_t* safetensors,
                                          size_t size);
EDGEFL_API int edgefl_trainer_get_adapter(edgefl_trainer* trainer, edgefl_buffer* out);
/* One SGD step on a batch: inputs in the manifest's input shape and dtype, batch_size int64
 * labels. */
EDGEFL_API int edgefl_trainer_step(edgefl_trainer* trainer, const void* inputs,
                                   size_t inputs_size, const int64_t* labels, float* loss);
/* Loss and gradients (safetensors) of a batch, without a step. */
EDGEFL_API int edgefl_trainer_gradients(edgefl_trainer* trainer, const void* inputs,
                                        size_t inputs_size, const int64_t* labels, float* loss,
                                        edgefl_buffer* gradients);
/* Logits outside `classes` get a -1e4 bias (continual learning); count 0 clears the mask. */
EDGEFL_API int edgefl_trainer_set_class_mask(edgefl_trainer* trainer, const int64_t* classes,
                                             size_t count);
/* Frozen weight of each listed layer := W0 + delta (safetensors, F32 (d_out, d_in) by layer):
 * exact aggregation's residual. */
EDGEFL_API int edgefl_trainer_set_base_delta(edgefl_trainer* trainer, const uint8_t* safetensors,
                                             size_t size);
/* `steps` SGD steps on a partition file's task (`task` NULL: its only task), batches drawn
 * with a seeded mt19937_64; mean loss and training accuracy out (either may be NULL). */
EDGEFL_API int edgefl_trainer_train_partition(edgefl_trainer* trainer, const char* partition_path,
                                              const char* task, int64_t steps, uint64_t seed,
                                              double* mean_loss, double* accuracy);

/* ---- codec: the protocol's messages (test vectors, tools) ------------------------------ */
/* Decodes a global, residual, update or status payload and describes it as JSON text
 * (kind, header, dense tensors); -1 with the rejection reason for a malformed payload. */
EDGEFL_API int edgefl_codec_describe(const uint8_t* payload, size_t size, edgefl_buffer* json);
/* Encodes an update from the JSON description edgefl_codec_describe gives (header fields and
 * dense tensors), with the header's encoding and topk. */
EDGEFL_API int edgefl_codec_encode_update(const char* json, edgefl_buffer* payload);
/* Wraps a payload in a signed frame (PROTOCOL.md section 12). */
EDGEFL_API int edgefl_codec_sign(const char* key_pem_path, const char* device_id,
                                 const uint8_t* payload, size_t size, edgefl_buffer* out);

#ifdef __cplusplus
}
#endif
#endif /* EDGEFL_DEVICE_H */
