/* kvf-engine's serving mode (serve.c). */
#ifndef KVF_ENGINE_SERVE_H
#define KVF_ENGINE_SERVE_H

/* Runs the engine as a server until SIGTERM or SIGINT; argv as kvf-engine's. Returns the exit
 * status. */
int kvfe_serve_main(int argc, char **argv);

#endif
