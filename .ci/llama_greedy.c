// Greedy decoding with llama.cpp from token ids, for checking the GGUF files metalcandle writes:
//   llama_greedy MODEL.gguf N_NEW LOGITS_OUT ID [ID ...]
// prints the N_NEW greedy ids on one line and writes the raw next-token logits of every step
// (float32, [N_NEW, n_vocab], little-endian) to LOGITS_OUT. No tokenizer, no sampling chain:
// the comparison is about the model, so ids go in and ids come out.
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW LOGITS_OUT ID [ID ...]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    const int n_new = atoi(argv[2]);
    const int n_prompt = argc - 4;
    llama_token *ids = malloc(sizeof(llama_token) * (size_t)(n_prompt + n_new));
    for (int i = 0; i < n_prompt; i++) ids[i] = atoi(argv[4 + i]);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "llama.cpp could not load %s\n", path);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt + n_new + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.no_perf = true;
    // f32 KV cache: the default f16 cache would add its own rounding to the comparison.
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama.cpp could not create a context for %s\n", path);
        return 1;
    }
    FILE *out = fopen(argv[3], "wb");
    if (!out) {
        fprintf(stderr, "cannot write %s\n", argv[3]);
        return 1;
    }
    struct llama_batch batch = llama_batch_get_one(ids, n_prompt);
    int n = n_prompt;
    for (int s = 0; s < n_new; s++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", s);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        fwrite(logits, sizeof(float), (size_t)n_vocab, out);
        int best = 0;
        for (int v = 1; v < n_vocab; v++)
            if (logits[v] > logits[best]) best = v;
        ids[n] = best;
        printf(s ? " %d" : "%d", best);
        batch = llama_batch_get_one(&ids[n], 1);
        n++;
    }
    printf("\n");
    fclose(out);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
