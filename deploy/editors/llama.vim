" llama.vim: FIM completion from codellm's llama.cpp-compatible /infill endpoint.
" Start the server with the completion model pinned (llama.vim sends no model name):
"   codellm serve --model qwen2.5-coder:1.5b-base
let g:llama_config = {
      \ 'endpoint': 'http://127.0.0.1:11435/infill',
      \ 'api_key': '',
      \ 'n_prefix': 256,
      \ 'n_suffix': 64,
      \ 'n_predict': 128,
      \ 't_max_prompt_ms': 500,
      \ 't_max_predict_ms': 1000,
      \ 'show_info': 2,
      \ 'auto_fim': v:true,
      \ 'ring_n_chunks': 16,
      \ }
