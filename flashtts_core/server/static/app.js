/* FlashTTS web page: plain JavaScript, no build step, no external resources. */
(() => {
  'use strict';

  // ---------------------------------------------------------------------------------------------------------
  // Constants and translations
  // ---------------------------------------------------------------------------------------------------------

  const LEVELS = ['very_low', 'low', 'moderate', 'high', 'very_high'];
  const STORE = { key: 'flashtts.apiKey', lang: 'flashtts.lang', settings: 'flashtts.settings' };
  const DOWNLOAD_NAMES = { clone: 'cloned_voice', role: 'role_voice', dialogue: 'multi_role_voice' };
  const DEFAULT_TEXT = {
    zh: '身临其境，换新体验。塑造开源语音合成新范式，让智能语音更自然。',
    en: 'Step right in for a brand-new experience: open-source speech synthesis that sounds more natural than ever.',
  };

  const I18N = {
    en: {
      skip: 'Skip to content',
      subtitle: 'High-quality speech synthesis and voice cloning',
      apiKey: 'API key',
      apiKeyPlaceholder: 'optional',
      show: 'Show',
      hide: 'Hide',
      switchLanguage: '切换到中文',
      dismiss: 'Dismiss',
      workTitle: 'Synthesis',
      modes: 'Modes',
      tabClone: 'Voice cloning',
      tabRole: 'Role voice',
      tabDialogue: 'Multi-role dialogue',
      tabVoices: 'Voice library',
      text: 'Text to speak',
      refText: 'Reference transcript (optional)',
      refTextPlaceholder: 'What is said in the reference audio: improves the clone',
      refAudio: 'Reference audio',
      dropHint: 'Drop an audio file here or click to choose',
      selected: 'Selected: {name}',
      record: 'Record',
      stopRecord: 'Stop recording',
      recording: 'Recording… {time}',
      recorded: 'Recorded {sec} s',
      micUnsupported: 'This browser cannot record audio here (microphone access needs HTTPS or localhost).',
      micError: 'Microphone unavailable: {msg}',
      latent: 'Latent file (.npy, MegaTTS3 only)',
      pitch: 'Pitch',
      speed: 'Speed',
      pitch_very_low: 'Very low', pitch_low: 'Low', pitch_moderate: 'Medium', pitch_high: 'High', pitch_very_high: 'Very high',
      speed_very_low: 'Very slow', speed_low: 'Slow', speed_moderate: 'Normal', speed_high: 'Fast', speed_very_high: 'Very fast',
      btnClone: 'Clone voice',
      voice: 'Voice',
      loading: 'Loading…',
      noVoicesOption: 'No voices available',
      btnSpeak: 'Generate speech',
      tagsLabel: 'Expressive tags (click to insert)',
      dialogueText: 'Dialogue script',
      dialoguePlaceholder: '<role:Alice>Hello! <role:Bob>Good morning.',
      dialogueHint: 'Each <role:NAME> tag starts a new speaker; text before the first tag is ignored.',
      chipsLabel: 'Voices (click to insert a tag at the cursor)',
      tagPitch: 'Pitch for inserted tags',
      tagSpeed: 'Speed for inserted tags',
      btnDialogue: 'Generate dialogue',
      voicesTitle: 'Voices',
      refresh: 'Refresh',
      builtin: 'built-in',
      custom: 'custom',
      preview: 'Preview',
      previewing: 'Playing…',
      previewVoice: 'Preview voice {name}',
      deleteVoice: 'Delete voice {name}',
      previewText: 'Hello! This is a short sample of my voice.',
      addVoiceTitle: 'Add a voice',
      voiceName: 'Name',
      transcript: 'Transcript of the reference (recommended)',
      btnAdd: 'Add voice',
      added: 'Voice “{name}” added.',
      deleted: 'Voice “{name}” deleted.',
      confirmTitle: 'Delete voice',
      confirmDelete: 'Delete the voice “{name}”? This cannot be undone.',
      cancel: 'Cancel',
      delete: 'Delete',
      noVoices: 'No voices yet.',
      noCloning: 'The loaded engine ({model}) cannot clone or store voices; its built-in voices are listed above.',
      settingsTitle: 'Generation settings',
      output: 'Output',
      format: 'Audio format',
      stream: 'Stream (play while generating)',
      streamHint: 'Streaming plays raw PCM as it arrives; the download is then a WAV file.',
      sampling: 'Sampling',
      temperature: 'Temperature',
      topP: 'Top P',
      topK: 'Top K',
      repPenalty: 'Repetition penalty',
      maxTokens: 'Max tokens',
      splitting: 'Long-text splitting',
      lengthThreshold: 'Length threshold',
      windowSize: 'Window size',
      reset: 'Reset to defaults',
      generating: 'Generating, please wait…',
      stop: 'Stop',
      resultTitle: 'Result',
      download: 'Download audio',
      took: 'Processing time: {time}',
      firstAudio: 'first audio after {time}',
      streamedSec: '{sec} s received',
      audioInfo: '{sec} s · {rate} Hz',
      done: 'Done.',
      stopped: 'Stopped.',
      footer: 'Open-source LLM speech synthesis',
      apiDocs: 'API documentation',
      needText: 'Enter some text first.',
      needAudio: 'Choose or record a reference audio first.',
      needLatent: 'This engine needs the latent file (.npy) of the reference audio.',
      needName: 'Enter a name for the voice.',
      needVoice: 'Choose a voice.',
      needTags: 'Mark who speaks with <role:NAME> tags (click a voice below to insert one).',
      noAudio: 'The server returned no audio.',
      tooLarge: '“{name}” is larger than the server limit of {mb} MB.',
      samplingHint: 'Values left at their default (dimmed) use the engine’s own default.',
      streamBroken: 'The stream broke off: {msg}',
      unauthorized: 'The server needs an API key: enter it at the top of the page.',
      network: 'Cannot reach the server: {msg}',
      offline: 'server unreachable',
      locked: 'API key needed',
      badge: '{model} · {rate} kHz',
      sec: '{s} s',
      minSec: '{m} min {s} s',
    },
    zh: {
      skip: '跳到主要内容',
      subtitle: '提供高质量语音合成与声音克隆服务',
      apiKey: 'API 密钥',
      apiKeyPlaceholder: '可选',
      show: '显示',
      hide: '隐藏',
      switchLanguage: 'Switch to English',
      dismiss: '关闭',
      workTitle: '语音合成',
      modes: '模式',
      tabClone: '声音克隆',
      tabRole: '角色语音',
      tabDialogue: '多角色合成',
      tabVoices: '音色库',
      text: '合成文本',
      refText: '参考音频文本（可选）',
      refTextPlaceholder: '参考音频中说的内容，填写后克隆效果更好',
      refAudio: '参考音频',
      dropHint: '拖放音频文件到此处，或点击选择',
      selected: '已选择: {name}',
      record: '开始录音',
      stopRecord: '停止录音',
      recording: '正在录音… {time}',
      recorded: '已录制 {sec} 秒',
      micUnsupported: '当前浏览器无法在此录音（麦克风需要 HTTPS 或 localhost）。',
      micError: '无法使用麦克风：{msg}',
      latent: 'Latent 文件（.npy，仅 MegaTTS3 需要）',
      pitch: '音高',
      speed: '语速',
      pitch_very_low: '极低', pitch_low: '低', pitch_moderate: '中', pitch_high: '高', pitch_very_high: '极高',
      speed_very_low: '极慢', speed_low: '慢', speed_moderate: '中', speed_high: '快', speed_very_high: '极快',
      btnClone: '克隆声音',
      voice: '角色',
      loading: '加载中...',
      noVoicesOption: '没有可用的角色',
      btnSpeak: '生成语音',
      tagsLabel: '情感标签（点击插入）',
      dialogueText: '对话文本',
      dialoguePlaceholder: '<role:角色1>你好，<role:角色2>早上好',
      dialogueHint: '每个 <role:角色名> 标签开始一位说话人；第一个标签之前的文字会被忽略。',
      chipsLabel: '支持的角色列表（点击可在输入文本中添加角色）',
      tagPitch: '插入标签的音高',
      tagSpeed: '插入标签的语速',
      btnDialogue: '生成语音',
      voicesTitle: '音色列表',
      refresh: '刷新',
      builtin: '内置',
      custom: '自定义',
      preview: '试听',
      previewing: '播放中…',
      previewVoice: '试听音色 {name}',
      deleteVoice: '删除音色 {name}',
      previewText: '你好，这是我的声音示例。',
      addVoiceTitle: '添加音色',
      voiceName: '名称',
      transcript: '参考音频文本（建议填写）',
      btnAdd: '添加音色',
      added: '已添加音色“{name}”。',
      deleted: '已删除音色“{name}”。',
      confirmTitle: '删除音色',
      confirmDelete: '确定删除音色“{name}”吗？此操作无法撤销。',
      cancel: '取消',
      delete: '删除',
      noVoices: '暂无音色。',
      noCloning: '当前引擎（{model}）不支持声音克隆和自定义音色，只能使用上面列出的内置音色。',
      settingsTitle: '生成参数设置',
      output: '输出',
      format: '音频格式',
      stream: '流式播放（边生成边播放）',
      streamHint: '流式模式以 PCM 实时播放，下载的文件为 WAV。',
      sampling: '采样',
      temperature: 'Temperature（温度）',
      topP: 'Top P',
      topK: 'Top K',
      repPenalty: '重复惩罚',
      maxTokens: '最大 token 数',
      splitting: '长文本分段',
      lengthThreshold: '分段阈值',
      windowSize: '窗口大小',
      reset: '恢复默认',
      generating: '正在生成，请稍候…',
      stop: '停止',
      resultTitle: '合成结果',
      download: '下载音频',
      took: '处理耗时: {time}',
      firstAudio: '首段音频 {time}',
      streamedSec: '已接收 {sec} 秒',
      audioInfo: '{sec} 秒 · {rate} Hz',
      done: '完成。',
      stopped: '已停止。',
      footer: '开源大模型语音合成',
      apiDocs: 'API 文档',
      needText: '请先输入文本。',
      needAudio: '请先选择或录制参考音频。',
      needLatent: '当前引擎需要参考音频的 latent 文件（.npy）。',
      needName: '请输入音色名称。',
      needVoice: '请选择角色。',
      needTags: '请用 <role:角色名> 标签标明说话人（点击下方角色即可插入）。',
      noAudio: '服务器没有返回音频。',
      tooLarge: '“{name}”超过服务器限制（{mb} MB）。',
      samplingHint: '保持默认值（灰色显示）的参数使用引擎自身的默认值。',
      streamBroken: '音频流中断：{msg}',
      unauthorized: '服务器需要 API 密钥，请在页面顶部填写。',
      network: '无法连接服务器：{msg}',
      offline: '无法连接服务器',
      locked: '需要 API 密钥',
      badge: '{model} · {rate} kHz',
      sec: '{s}秒',
      minSec: '{m}分{s}秒',
    },
  };

  // ---------------------------------------------------------------------------------------------------------
  // Small helpers
  // ---------------------------------------------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  function storageGet(key) {
    try { return window.localStorage.getItem(key); } catch (_) { return null; }
  }
  function storageSet(key, value) {
    try {
      if (value === null || value === '') window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch (_) { /* private mode: keep it in memory only */ }
  }

  function initialLang() {
    const saved = storageGet(STORE.lang);
    if (saved === 'zh' || saved === 'en') return saved;
    const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || 'en'];
    return String(langs[0] || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
  }

  const state = {
    lang: initialLang(),
    apiKey: storageGet(STORE.key) || '',
    features: {
      model: null, sampleRate: null, cloning: true, latent: false, pitch: true, speed: true, tags: [],
      builtin: new Set(), maxRefSeconds: 30,
    },
    roles: [],
    rolesToken: 0,
    busy: false,
    job: null, // {controller, player}
    urls: [],
    previewUrl: null,
    tab: 'clone',
  };

  function t(key, vars) {
    const table = I18N[state.lang] || I18N.en;
    let s = key in table ? table[key] : (I18N.en[key] !== undefined ? I18N.en[key] : key);
    if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
    return s;
  }

  function setText(el, key, vars) {
    el.dataset.i18n = key;
    if (vars) el.dataset.i18nVars = JSON.stringify(vars); else delete el.dataset.i18nVars;
    el.textContent = t(key, vars);
  }

  function fmtClock(ms) {
    const total = Math.floor(ms / 1000);
    const pad = (n) => String(n).padStart(2, '0');
    return `${pad(Math.floor(total / 3600))}:${pad(Math.floor((total % 3600) / 60))}:${pad(total % 60)}`;
  }

  function fmtDuration(ms) {
    const sec = ms / 1000;
    if (sec < 60) return t('sec', { s: sec.toFixed(3) });
    const m = Math.floor(sec / 60);
    return t('minSec', { m, s: (sec - m * 60).toFixed(3) });
  }

  // Directory the page is served from (works behind a reverse proxy sub-path too).
  const BASE = (() => {
    if (location.protocol === 'file:') return '';
    return location.pathname.replace(/[^/]*$/, '').replace(/static\/$/, '');
  })();

  // ---------------------------------------------------------------------------------------------------------
  // API access
  // ---------------------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
    }
  }

  function errorMessage(status, text) {
    let body = null;
    try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
    if (body && typeof body === 'object') {
      const err = body.error;
      if (err && typeof err === 'object' && err.message) return String(err.message);
      if (typeof err === 'string' && err) return err;
      const detail = body.detail;
      if (typeof detail === 'string' && detail) {
        const extra = Array.isArray(body.extra) ? body.extra.map((x) => x && (x.message || JSON.stringify(x))).join('; ') : '';
        return extra ? `${detail}: ${extra}` : detail;
      }
      if (Array.isArray(detail)) {
        return detail.map((d) => (d && d.loc ? `${d.loc.join('.')}: ${d.msg}` : JSON.stringify(d))).join('; ');
      }
      if (detail && typeof detail === 'object' && detail.message) return String(detail.message);
      if (body.message) return String(body.message);
    }
    const plain = (text || '').trim();
    if (plain && !plain.startsWith('<')) return plain.slice(0, 600);
    return `HTTP ${status}`;
  }

  async function api(path, { method = 'GET', json, form, signal } = {}) {
    const headers = {};
    if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
    let body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    let res;
    try {
      res = await fetch(BASE + path, { method, headers, body, signal, cache: 'no-store' });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(t('network', { msg: e && e.message ? e.message : String(e) }), 0);
    }
    if (!res.ok) {
      let text = '';
      try { text = await res.text(); } catch (_) { /* ignore */ }
      let msg = errorMessage(res.status, text);
      if (res.status === 401) {
        msg = `${t('unauthorized')} (${msg})`;
        flagApiKey();
      }
      throw new ApiError(msg, res.status);
    }
    return res;
  }

  function flagApiKey() {
    const input = $('#api-key');
    input.setAttribute('aria-invalid', 'true');
  }

  // ---------------------------------------------------------------------------------------------------------
  // Alerts
  // ---------------------------------------------------------------------------------------------------------

  function showAlert(el, message, type = 'error', { autohide = type === 'success' || type === 'info' } = {}) {
    if (!el) return;
    clearTimeout(el._timer);
    el.classList.remove('alert-error', 'alert-success', 'alert-warning', 'alert-info');
    el.classList.add('alert', `alert-${type}`);
    el.setAttribute('role', type === 'error' || type === 'warning' ? 'alert' : 'status');
    el.replaceChildren();
    const span = document.createElement('span');
    span.className = 'alert-text';
    span.textContent = message;
    const close = document.createElement('button');
    close.type = 'button';
    close.className = 'alert-close';
    close.setAttribute('aria-label', t('dismiss'));
    close.textContent = '×';
    close.addEventListener('click', () => hideAlert(el));
    el.append(span, close);
    el.hidden = false;
    el.dataset.type = type;
    if (autohide) el._timer = setTimeout(() => hideAlert(el), 5000);
  }

  function hideAlert(el) {
    if (!el) return;
    clearTimeout(el._timer);
    el.hidden = true;
    el.replaceChildren();
    delete el.dataset.type;
  }

  const globalAlert = () => $('#global-alert');

  // ---------------------------------------------------------------------------------------------------------
  // Audio helpers: WAV encoding, recording, streamed playback
  // ---------------------------------------------------------------------------------------------------------

  function wavBlob(int16, rate) {
    const header = new ArrayBuffer(44);
    const v = new DataView(header);
    const dataBytes = int16.length * 2;
    const str = (off, s) => { for (let i = 0; i < s.length; i++) v.setUint8(off + i, s.charCodeAt(i)); };
    str(0, 'RIFF'); v.setUint32(4, 36 + dataBytes, true); str(8, 'WAVE');
    str(12, 'fmt '); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    str(36, 'data'); v.setUint32(40, dataBytes, true);
    const data = new DataView(new ArrayBuffer(dataBytes));
    for (let i = 0; i < int16.length; i++) data.setInt16(i * 2, int16[i], true);
    return new Blob([header, data.buffer], { type: 'audio/wav' });
  }

  function floatToInt16(f32) {
    const out = new Int16Array(f32.length);
    for (let i = 0; i < f32.length; i++) {
      const x = Math.max(-1, Math.min(1, f32[i]));
      out[i] = x < 0 ? Math.round(x * 32768) : Math.round(x * 32767);
    }
    return out;
  }

  function bytesToInt16(bytes) {
    const n = bytes.length >> 1;
    const dv = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
    const out = new Int16Array(n);
    for (let i = 0; i < n; i++) out[i] = dv.getInt16(i * 2, true);
    return out;
  }

  function audioContextClass() {
    return window.AudioContext || window.webkitAudioContext || null;
  }

  // Decode any recorded blob, mix down to mono 16 kHz and return a WAV blob.
  async function recordingToWav(blob, rate = 16000) {
    const Ctx = audioContextClass();
    const Offline = window.OfflineAudioContext || window.webkitOfflineAudioContext;
    if (!Ctx || !Offline) return null;
    const ctx = new Ctx();
    try {
      const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
      const length = Math.max(1, Math.ceil(decoded.duration * rate));
      const off = new Offline(1, length, rate);
      const src = off.createBufferSource();
      src.buffer = decoded;
      src.connect(off.destination);
      src.start();
      const rendered = await off.startRendering();
      return wavBlob(floatToInt16(rendered.getChannelData(0)), rate);
    } finally {
      ctx.close().catch(() => {});
    }
  }

  // Schedules streamed s16le PCM chunks back to back on a Web Audio clock.
  class StreamPlayer {
    constructor() {
      const Ctx = audioContextClass();
      this.ctx = Ctx ? new Ctx() : null;
      if (this.ctx && this.ctx.state === 'suspended') this.ctx.resume().catch(() => {});
      this.rate = 16000;
      this.parts = [];
      this.samples = 0;
      this.played = 0;
      this.rest = null;
      this.next = 0;
      this.sources = new Set();
      this.closed = false;
    }

    push(bytes) {
      if (this.rest) {
        const merged = new Uint8Array(this.rest.length + bytes.length);
        merged.set(this.rest, 0);
        merged.set(bytes, this.rest.length);
        bytes = merged;
        this.rest = null;
      }
      const even = bytes.length & ~1;
      if (even < bytes.length) this.rest = bytes.slice(even);
      if (!even) return;
      const pcm = bytesToInt16(bytes.subarray(0, even));
      this.parts.push(pcm);
      this.samples += pcm.length;
      if (!this.ctx || this.closed) return;
      const f32 = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f32[i] = pcm[i] / 32768;
      const buf = this.ctx.createBuffer(1, f32.length, this.rate);
      buf.getChannelData(0).set(f32);
      const src = this.ctx.createBufferSource();
      src.buffer = buf;
      src.connect(this.ctx.destination);
      const now = this.ctx.currentTime;
      if (this.next < now + 0.03) this.next = now + 0.12; // first chunk or an underrun: small safety lead
      src.start(this.next);
      this.next += buf.duration;
      this.sources.add(src);
      src.onended = () => {
        this.sources.delete(src);
        this.played += f32.length;
        const result = $('#result');
        result.dataset.playedSamples = String(this.played);
      };
    }

    get seconds() { return this.samples / this.rate; }

    // Close the context once everything scheduled has been heard.
    finish() {
      if (!this.ctx || this.closed) return;
      const wait = Math.max(0, this.next - this.ctx.currentTime) * 1000 + 500;
      setTimeout(() => this.stop(), wait);
    }

    stop() {
      if (this.closed) return;
      this.closed = true;
      for (const s of this.sources) { try { s.stop(); } catch (_) { /* already stopped */ } }
      this.sources.clear();
      if (this.ctx) this.ctx.close().catch(() => {});
    }

    toWav() {
      const all = new Int16Array(this.samples);
      let off = 0;
      for (const p of this.parts) { all.set(p, off); off += p.length; }
      return wavBlob(all, this.rate);
    }
  }

  function base64ToBytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // Feed the body of a streamed response to onBytes: raw PCM, or OpenAI-style SSE audio deltas.
  async function readAudioStream(res, onBytes) {
    const reader = res.body.getReader();
    const ctype = (res.headers.get('Content-Type') || '').toLowerCase();
    if (!ctype.includes('text/event-stream')) {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        if (value && value.length) onBytes(value);
      }
    }
    const decoder = new TextDecoder();
    let buffer = '';
    const handle = (block) => {
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
      if (!data || data === '[DONE]') return;
      const ev = JSON.parse(data);
      if (ev.type === 'speech.audio.delta' && ev.audio) onBytes(base64ToBytes(ev.audio));
      else if (ev.error || /error/.test(String(ev.type || ''))) {
        throw new ApiError(ev.message || errorMessage(500, data), 500);
      }
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      let idx;
      while ((idx = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, idx);
        buffer = buffer.slice(idx).replace(/^\r?\n\r?\n/, '');
        handle(block);
      }
      if (done) { if (buffer.trim()) handle(buffer); return; }
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Reference-audio picker: file upload, drag and drop, microphone recording
  // ---------------------------------------------------------------------------------------------------------

  class AudioSource {
    constructor(root, alertEl) {
      this.root = root;
      this.alertEl = alertEl;
      this.input = $('input[type="file"]', root);
      this.zone = $('.dropzone', root);
      this.fileLabel = $('.dropzone-file', root);
      this.preview = $('.source-preview', root);
      this.recBtn = $('.record-btn', root);
      this.recLabel = $('.record-label', root);
      this.recStatus = $('.record-status', root);
      this.file = null;
      this.url = null;
      this.recorder = null;

      this.input.addEventListener('change', () => {
        if (this.input.files && this.input.files[0]) this.setFile(this.input.files[0]);
      });
      ['dragenter', 'dragover'].forEach((ev) => this.zone.addEventListener(ev, (e) => {
        e.preventDefault();
        this.zone.classList.add('dragover');
      }));
      ['dragleave', 'drop'].forEach((ev) => this.zone.addEventListener(ev, () => this.zone.classList.remove('dragover')));
      this.zone.addEventListener('drop', (e) => {
        e.preventDefault();
        const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
        if (f) this.setFile(f, true);
      });
      this.recBtn.addEventListener('click', () => (this.recorder ? this.stopRecording() : this.startRecording()));
    }

    setFile(file, inject = false) {
      const limit = state.features.maxUpload;
      if (file && limit && file.size > limit) {
        showAlert(this.alertEl, t('tooLarge', { name: file.name, mb: (limit / 1e6).toFixed(1) }), 'warning');
        this.input.value = '';
        file = null;
      }
      this.file = file || null;
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = null;
      if (inject && file) {
        try {
          const dt = new DataTransfer();
          dt.items.add(file);
          this.input.files = dt.files;
        } catch (_) { /* old browsers: keep the File in memory only */ }
      }
      this.zone.classList.toggle('has-file', !!file);
      if (file) {
        setText(this.fileLabel, 'selected', { name: file.name });
        this.url = URL.createObjectURL(file);
        this.preview.src = this.url;
        this.preview.hidden = false;
      } else {
        this.fileLabel.textContent = '';
        delete this.fileLabel.dataset.i18n;
        this.preview.removeAttribute('src');
        this.preview.hidden = true;
      }
    }

    clear() {
      this.input.value = '';
      this.setFile(null);
      this.recStatus.textContent = '';
    }

    async startRecording() {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.MediaRecorder) {
        showAlert(this.alertEl, t('micUnsupported'), 'warning');
        return;
      }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({
          audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        });
      } catch (e) {
        showAlert(this.alertEl, t('micError', { msg: e && e.message ? e.message : String(e) }), 'error');
        return;
      }
      const types = ['audio/webm;codecs=opus', 'audio/webm', 'audio/ogg;codecs=opus', 'audio/mp4'];
      const mimeType = types.find((m) => MediaRecorder.isTypeSupported && MediaRecorder.isTypeSupported(m));
      let rec;
      try {
        rec = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
      } catch (e) {
        stream.getTracks().forEach((tr) => tr.stop());
        showAlert(this.alertEl, t('micError', { msg: e.message }), 'error');
        return;
      }
      const chunks = [];
      const started = performance.now();
      rec.ondataavailable = (e) => { if (e.data && e.data.size) chunks.push(e.data); };
      rec.onstop = async () => {
        clearInterval(this.recTimer);
        stream.getTracks().forEach((tr) => tr.stop());
        this.recorder = null;
        this.recBtn.setAttribute('aria-pressed', 'false');
        setText(this.recLabel, 'record');
        const blob = new Blob(chunks, { type: rec.mimeType || mimeType || 'audio/webm' });
        let file;
        try {
          const wav = await recordingToWav(blob);
          if (wav) file = new File([wav], 'recording.wav', { type: 'audio/wav' });
        } catch (_) { /* fall back to the raw recording; the server decodes it */ }
        if (!file) {
          const ext = (blob.type.split('/')[1] || 'webm').split(';')[0];
          file = new File([blob], `recording.${ext}`, { type: blob.type });
        }
        this.setFile(file, true);
        setText(this.recStatus, 'recorded', { sec: ((performance.now() - started) / 1000).toFixed(1) });
      };
      this.recorder = rec;
      rec.start(250);
      this.recBtn.setAttribute('aria-pressed', 'true');
      setText(this.recLabel, 'stopRecord');
      const maxMs = (state.features.maxRefSeconds || 30) * 1000;
      const tick = () => {
        const ms = performance.now() - started;
        setText(this.recStatus, 'recording', { time: fmtClock(ms).slice(3) });
        if (ms >= maxMs) this.stopRecording();
      };
      tick();
      this.recTimer = setInterval(tick, 250);
    }

    stopRecording() {
      if (this.recorder && this.recorder.state !== 'inactive') this.recorder.stop();
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Settings panel
  // ---------------------------------------------------------------------------------------------------------

  const NUMERIC = {
    temperature: parseFloat, top_p: parseFloat, top_k: (v) => parseInt(v, 10),
    repetition_penalty: parseFloat, max_tokens: (v) => parseInt(v, 10),
    length_threshold: (v) => parseInt(v, 10), window_size: (v) => parseInt(v, 10),
  };

  function settingsForm() { return $('#form-settings'); }

  function updateOutputs() {
    $$('.slider', settingsForm()).forEach((row) => {
      const input = $('input', row);
      const out = $('output', row);
      out.textContent = input.value;
      out.classList.toggle('is-default', Number(input.value) === Number(input.defaultValue));
    });
  }

  function readSettings() {
    const f = settingsForm();
    const out = {
      response_format: f.elements.response_format.value,
      stream: f.elements.stream.checked,
    };
    for (const [name, conv] of Object.entries(NUMERIC)) {
      const el = f.elements[name];
      let value = conv(el.value);
      if (!Number.isFinite(value)) value = conv(el.defaultValue);
      out[name] = value;
    }
    return out;
  }

  function saveSettings() {
    storageSet(STORE.settings, JSON.stringify(readSettings()));
  }

  function loadSettings() {
    let saved = null;
    try { saved = JSON.parse(storageGet(STORE.settings) || 'null'); } catch (_) { saved = null; }
    if (!saved || typeof saved !== 'object') return;
    const f = settingsForm();
    for (const [name, value] of Object.entries(saved)) {
      const el = f.elements[name];
      if (!el) continue;
      if (el.type === 'checkbox') el.checked = !!value;
      else if (el.tagName === 'SELECT') { if ($$('option', el).some((o) => o.value === value)) el.value = value; }
      else if (Number.isFinite(value)) el.value = String(value);
    }
  }

  function resetSettings() {
    const f = settingsForm();
    for (const el of Array.from(f.elements)) {
      if (el.type === 'checkbox') el.checked = el.defaultChecked;
      else if (el.tagName === 'SELECT') {
        const def = $$('option', el).find((o) => o.defaultSelected) || el.options[0];
        el.value = def.value;
      } else if (el.tagName === 'INPUT') el.value = el.defaultValue;
    }
    updateOutputs();
    saveSettings();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Translation of the static page
  // ---------------------------------------------------------------------------------------------------------

  function fillLevelSelects() {
    $$('select[data-levels]').forEach((sel) => {
      const kind = sel.dataset.levels;
      const current = sel.value || 'moderate';
      sel.replaceChildren(...LEVELS.map((lv) => {
        const o = document.createElement('option');
        o.value = lv;
        o.textContent = t(`${kind}_${lv}`);
        return o;
      }));
      sel.value = current;
    });
  }

  function applyLanguage() {
    document.documentElement.lang = state.lang === 'zh' ? 'zh-CN' : 'en';
    document.title = state.lang === 'zh' ? 'FlashTTS 语音合成与克隆平台' : 'FlashTTS — speech synthesis and voice cloning';
    $$('[data-i18n]').forEach((el) => {
      let vars;
      if (el.dataset.i18nVars) { try { vars = JSON.parse(el.dataset.i18nVars); } catch (_) { vars = undefined; } }
      el.textContent = t(el.dataset.i18n, vars);
    });
    $$('[data-i18n-placeholder]').forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
    $$('[data-i18n-aria-label]').forEach((el) => { el.setAttribute('aria-label', t(el.dataset.i18nAriaLabel)); });
    $$('.alert-close').forEach((el) => el.setAttribute('aria-label', t('dismiss')));
    const toggle = $('#lang-toggle');
    toggle.textContent = state.lang === 'zh' ? 'EN' : '中文';
    toggle.lang = state.lang === 'zh' ? 'en' : 'zh-CN';
    fillLevelSelects();
    const other = state.lang === 'zh' ? 'en' : 'zh';
    $$('textarea[data-default-text]').forEach((ta) => {
      if (!ta.value.trim() || ta.value === DEFAULT_TEXT[other]) ta.value = DEFAULT_TEXT[state.lang];
    });
    renderBadge();
    renderRoles();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Engine information and feature switches
  // ---------------------------------------------------------------------------------------------------------

  function renderBadge(status) {
    const badge = $('#engine-badge');
    if (status) badge.dataset.state = status;
    const f = state.features;
    if (badge.dataset.state === 'ok' && f.model) {
      badge.textContent = t('badge', { model: f.model, rate: f.sampleRate ? (f.sampleRate / 1000).toString() : '?' });
    } else if (badge.dataset.state === 'locked') {
      badge.textContent = t('locked');
    } else if (badge.dataset.state === 'error') {
      badge.textContent = t('offline');
    } else {
      badge.textContent = t('loading');
    }
  }

  function namesOf(list) {
    if (!Array.isArray(list)) return [];
    return list.map((v) => (typeof v === 'string' ? v : v && (v.name || v.id))).filter(Boolean).map(String);
  }

  function applyInfo(info) {
    const f = state.features;
    f.model = info.model || info.engine || null;
    f.sampleRate = Number(info.sample_rate) || null;
    f.cloning = 'supports_cloning' in info ? !!info.supports_cloning : f.model !== 'orpheus';
    f.latent = 'requires_latent' in info ? !!info.requires_latent : f.model === 'mega';
    if (Array.isArray(info.controls)) {
      f.pitch = info.controls.includes('pitch');
      f.speed = info.controls.includes('speed');
    } else {
      const known = f.model === 'spark' || !f.model;
      f.pitch = known;
      f.speed = known;
    }
    f.tags = Array.isArray(info.tags) ? info.tags.map(String) : [];
    f.builtin = new Set(namesOf(info.builtin_voices));
    f.defaultVoice = typeof info.default_voice === 'string' ? info.default_voice : null;
    if (Number(info.reference_max_seconds) > 0) f.maxRefSeconds = Number(info.reference_max_seconds);
    if (Array.isArray(info.roles) && !state.roles.length) state.roles = namesOf(info.roles);
    f.maxUpload = Number(info.max_upload_bytes) > 0 ? Number(info.max_upload_bytes) : null;
    if (Number(info.max_text_chars) > 0) {
      $$('#form-clone textarea[name="text"], #form-role textarea[name="text"], #form-dialogue textarea[name="text"]')
        .forEach((ta) => { ta.maxLength = Number(info.max_text_chars); });
    }
    if (Array.isArray(info.response_formats) && info.response_formats.length) {
      const sel = settingsForm().elements.response_format;
      $$('option', sel).forEach((o) => { o.hidden = o.disabled = !info.response_formats.includes(o.value); });
      if (sel.selectedOptions[0] && sel.selectedOptions[0].disabled) {
        sel.value = info.response_formats.includes('mp3') ? 'mp3' : info.response_formats[0];
      }
    }
    applyFeatures();
  }

  function applyFeatures() {
    const f = state.features;
    const has = {
      pitch: f.pitch, speed: f.speed, cloning: f.cloning, 'no-cloning': !f.cloning,
      latent: f.cloning && f.latent, tags: f.tags.length > 0,
    };
    $$('[data-needs]').forEach((el) => {
      const needs = el.dataset.needs.split(/\s+/);
      el.hidden = !needs.some((n) => has[n]);
    });
    const noClone = $('[data-needs="no-cloning"]');
    if (noClone) setText(noClone, 'noCloning', { model: f.model || '?' });
    $('#tab-clone').hidden = !f.cloning;
    if (!f.cloning && state.tab === 'clone') selectTab('role');
    $$('.tag-chips .chips').forEach((box) => {
      box.replaceChildren(...f.tags.map((tag) => {
        const text = tag.startsWith('<') ? tag : `<${tag}>`;
        const b = document.createElement('button');
        b.type = 'button';
        b.className = 'chip';
        b.textContent = text;
        b.addEventListener('click', () => insertAtCursor(document.getElementById(box.dataset.tagTarget), text));
        return b;
      }));
    });
  }

  async function loadInfo() {
    renderBadge('loading');
    try {
      const res = await api('server_info');
      const body = await res.json();
      applyInfo(body.info || body);
      renderBadge('ok');
      $('#api-key').removeAttribute('aria-invalid');
      return true;
    } catch (e) {
      renderBadge(e.status === 401 ? 'locked' : 'error');
      showAlert(globalAlert(), e.message, 'error');
      return false;
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Voices: role select, dialogue chips, voice library
  // ---------------------------------------------------------------------------------------------------------

  async function loadRoles() {
    const token = ++state.rolesToken;
    try {
      const res = await api('audio_roles');
      const body = await res.json();
      if (token !== state.rolesToken) return;
      state.roles = namesOf(body.roles || body.voices || []);
      renderRoles();
    } catch (e) {
      if (token !== state.rolesToken) return;
      showAlert(globalAlert(), e.message, 'error');
    }
  }

  function insertAtCursor(ta, snippet) {
    const len = ta.value.length;
    const start = typeof ta.selectionStart === 'number' ? ta.selectionStart : len;
    const end = typeof ta.selectionEnd === 'number' ? ta.selectionEnd : start;
    const before = ta.value.slice(0, start);
    const after = ta.value.slice(end);
    const pad = before && !/\s$/.test(before) ? ' ' : '';
    ta.value = before + pad + snippet + after;
    const pos = (before + pad + snippet).length;
    ta.focus();
    ta.setSelectionRange(pos, pos);
    ta.dispatchEvent(new Event('input', { bubbles: true }));
  }

  function roleTag(name) {
    let tag = `<role:${name}`;
    const f = state.features;
    const p = $('#tag-pitch').value;
    const s = $('#tag-speed').value;
    if (f.pitch && p && p !== 'moderate') tag += `,pitch:${p}`;
    if (f.speed && s && s !== 'moderate') tag += `,speed:${s}`;
    return `${tag}>`;
  }

  function renderRoles() {
    const roles = state.roles;
    // role select
    const sel = $('#role-name');
    const previous = sel.value;
    if (roles.length) {
      sel.replaceChildren(...roles.map((r) => {
        const o = document.createElement('option');
        o.value = r;
        o.textContent = r;
        return o;
      }));
      if (roles.includes(previous)) sel.value = previous;
      else if (state.features.defaultVoice && roles.includes(state.features.defaultVoice)) {
        sel.value = state.features.defaultVoice;
      }
    } else {
      const o = document.createElement('option');
      o.value = '';
      setText(o, $('#engine-badge').dataset.state === 'ok' ? 'noVoicesOption' : 'loading');
      sel.replaceChildren(o);
    }
    // dialogue chips
    const chips = $('#role-chips');
    if (roles.length) {
      chips.replaceChildren(...roles.map((r) => {
        const b = document.createElement('button');
        b.type = 'button';
        b.className = 'chip';
        b.textContent = r;
        b.dataset.role = r;
        b.addEventListener('click', () => insertAtCursor($('#dialogue-text'), roleTag(r)));
        return b;
      }));
    } else {
      const span = document.createElement('span');
      span.className = 'empty';
      setText(span, 'noVoices');
      chips.replaceChildren(span);
    }
    // library
    const list = $('#voice-list');
    if (!roles.length) {
      const li = document.createElement('li');
      li.className = 'empty';
      setText(li, 'noVoices');
      list.replaceChildren(li);
      return;
    }
    const f = state.features;
    list.replaceChildren(...roles.map((r) => {
      const li = document.createElement('li');
      li.className = 'voice-item';
      li.dataset.voice = r;
      const name = document.createElement('span');
      name.className = 'voice-name';
      name.textContent = r;
      li.append(name);
      const builtin = f.builtin.has(r);
      if (f.builtin.size) {
        const kind = document.createElement('span');
        kind.className = `voice-kind ${builtin ? 'builtin' : 'custom'}`;
        setText(kind, builtin ? 'builtin' : 'custom');
        li.append(kind);
      }
      const play = document.createElement('button');
      play.type = 'button';
      play.className = 'btn btn-secondary btn-small preview-btn';
      setText(play, 'preview');
      play.setAttribute('aria-label', t('previewVoice', { name: r }));
      play.addEventListener('click', () => previewVoice(r, play));
      li.append(play);
      if (f.cloning && !builtin) {
        const del = document.createElement('button');
        del.type = 'button';
        del.className = 'btn btn-ghost btn-small delete-btn';
        setText(del, 'delete');
        del.setAttribute('aria-label', t('deleteVoice', { name: r }));
        del.addEventListener('click', () => deleteVoice(r, del));
        li.append(del);
      }
      return li;
    }));
  }

  async function previewVoice(name, btn) {
    const player = $('#preview-player');
    const alertEl = $('#voices-alert');
    player.pause();
    $$('.preview-btn[aria-busy="true"]').forEach((b) => { b.removeAttribute('aria-busy'); setText(b, 'preview'); });
    btn.setAttribute('aria-busy', 'true');
    setText(btn, 'previewing');
    const s = readSettings();
    const reset = () => { btn.removeAttribute('aria-busy'); setText(btn, 'preview'); };
    try {
      const res = await api('speak', {
        method: 'POST',
        json: { name, text: t('previewText'), response_format: 'wav', stream: false, ...sampling(s) },
      });
      const blob = await res.blob();
      if (!blob.size) throw new ApiError(t('noAudio'), 200);
      if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
      state.previewUrl = URL.createObjectURL(blob);
      player.src = state.previewUrl;
      player.dataset.voice = name;
      player.onended = reset;
      player.onerror = reset;
      try { await player.play(); } catch (_) { reset(); }
    } catch (e) {
      reset();
      showAlert(alertEl, e.message, 'error');
    }
  }

  function confirmDialog(message) {
    const dlg = $('#confirm-dialog');
    if (!dlg || typeof dlg.showModal !== 'function') return Promise.resolve(window.confirm(message));
    $('#confirm-message').textContent = message;
    return new Promise((resolve) => {
      dlg.returnValue = '';
      dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
      dlg.showModal();
    });
  }

  async function deleteVoice(name, btn) {
    const alertEl = $('#voices-alert');
    if (!(await confirmDialog(t('confirmDelete', { name })))) { btn.focus(); return; }
    btn.disabled = true;
    try {
      const fd = new FormData();
      fd.append('name', name);
      await api('delete_speaker', { method: 'POST', form: fd });
      showAlert(alertEl, t('deleted', { name }), 'success');
      await loadRoles();
      $('#voices-refresh').focus();
    } catch (e) {
      btn.disabled = false;
      showAlert(alertEl, e.message, 'error');
    }
  }

  async function addVoice(form, source) {
    const alertEl = $('#voices-alert');
    const name = form.elements.name.value.trim();
    const f = state.features;
    if (!name) { showAlert(alertEl, t('needName'), 'warning'); form.elements.name.focus(); return; }
    if (!source.file) { showAlert(alertEl, t('needAudio'), 'warning'); return; }
    const latent = form.elements.latent_file.files && form.elements.latent_file.files[0];
    if (f.latent && !latent) { showAlert(alertEl, t('needLatent'), 'warning'); return; }
    const fd = new FormData();
    fd.append('name', name);
    fd.append('audio_file', source.file, source.file.name || 'reference.wav');
    const text = form.elements.reference_text.value.trim();
    if (text) fd.append('reference_text', text);
    if (f.latent && latent) fd.append('latent_file', latent, latent.name);
    const submit = $('button[type="submit"]', form);
    submit.disabled = true;
    submit.setAttribute('aria-busy', 'true');
    try {
      await api('add_speaker', { method: 'POST', form: fd });
      showAlert(alertEl, t('added', { name }), 'success');
      form.reset();
      source.clear();
      await loadRoles();
    } catch (e) {
      showAlert(alertEl, e.message, 'error');
    } finally {
      submit.disabled = false;
      submit.removeAttribute('aria-busy');
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Synthesis
  // ---------------------------------------------------------------------------------------------------------

  class InputProblem extends Error {}

  // Only the values the user moved away from their default are sent: the server then applies the engine's own
  // defaults (a backend that lacks a sampling feature refuses requests that set it explicitly).
  function sampling(s) {
    const out = {};
    const f = settingsForm();
    for (const name of Object.keys(NUMERIC)) {
      if (s[name] !== NUMERIC[name](f.elements[name].defaultValue)) out[name] = s[name];
    }
    return out;
  }

  const builders = {
    clone(form, s, fmt, sources) {
      const f = state.features;
      const text = form.elements.text.value.trim();
      if (!text) throw new InputProblem(t('needText'));
      const src = sources.clone;
      if (!src.file) throw new InputProblem(t('needAudio'));
      const latent = form.elements.latent_file.files && form.elements.latent_file.files[0];
      if (f.latent && !latent) throw new InputProblem(t('needLatent'));
      const fd = new FormData();
      fd.append('text', text);
      fd.append('reference_audio_file', src.file, src.file.name || 'reference.wav');
      const refText = form.elements.reference_text.value.trim();
      if (refText) fd.append('reference_text', refText);
      if (f.pitch) fd.append('pitch', form.elements.pitch.value);
      if (f.speed) fd.append('speed', form.elements.speed.value);
      if (f.latent && latent) fd.append('latent_file', latent, latent.name);
      for (const [k, v] of Object.entries(sampling(s))) fd.append(k, String(v));
      fd.append('stream', String(s.stream));
      fd.append('response_format', fmt);
      return { path: 'clone_voice', form: fd };
    },
    role(form, s, fmt) {
      const f = state.features;
      const text = form.elements.text.value.trim();
      if (!text) throw new InputProblem(t('needText'));
      const name = form.elements.name.value;
      if (!name) throw new InputProblem(t('needVoice'));
      const json = { name, text, ...sampling(s), stream: s.stream, response_format: fmt };
      if (f.pitch) json.pitch = form.elements.pitch.value;
      if (f.speed) json.speed = form.elements.speed.value;
      return { path: 'speak', json };
    },
    dialogue(form, s, fmt) {
      const text = form.elements.text.value.trim();
      if (!text) throw new InputProblem(t('needText'));
      if (!/<role:[^>]+>/.test(text)) throw new InputProblem(t('needTags'));
      return { path: 'multi_speak', json: { text, ...sampling(s), stream: s.stream, response_format: fmt } };
    },
  };

  function setBusy(busy) {
    state.busy = busy;
    $$('#form-clone button[type="submit"], #form-role button[type="submit"], #form-dialogue button[type="submit"]')
      .forEach((b) => { b.disabled = busy; b.setAttribute('aria-busy', String(busy)); });
    $('#progress').hidden = !busy;
    document.body.dataset.busy = busy ? '1' : '0';
  }

  let timerHandle = null;
  function startTimer() {
    const started = performance.now();
    const el = $('#progress-timer');
    el.textContent = fmtClock(0);
    $('#progress-stream').textContent = '';
    clearInterval(timerHandle);
    timerHandle = setInterval(() => { el.textContent = fmtClock(performance.now() - started); }, 250);
    return started;
  }
  function stopTimer() { clearInterval(timerHandle); timerHandle = null; }

  function showResult({ playBlob, downloadBlob, filename, autoplay, meta, info, mode, samples }) {
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    const playUrl = URL.createObjectURL(playBlob);
    const dlUrl = downloadBlob && downloadBlob !== playBlob ? URL.createObjectURL(downloadBlob) : playUrl;
    state.urls = playUrl === dlUrl ? [playUrl] : [playUrl, dlUrl];
    const audio = $('#result-audio');
    audio.src = playUrl;
    const link = $('#download-link');
    link.href = dlUrl;
    link.download = filename;
    $('#result-meta').textContent = meta || '';
    $('#result-info').textContent = info || '';
    const result = $('#result');
    result.dataset.mode = mode;
    result.dataset.samples = String(samples || 0);
    result.dataset.filename = filename;
    result.hidden = false;
    if (autoplay) audio.play().catch(() => { /* autoplay blocked: the controls are there */ });
  }

  async function synthesize(kind, form, sources) {
    if (state.busy) return;
    const alertEl = $('.alert', form);
    hideAlert(alertEl);
    const s = readSettings();
    const fmt = s.stream ? 'pcm' : s.response_format;
    let req;
    try {
      req = builders[kind](form, s, fmt, sources);
    } catch (e) {
      if (e instanceof InputProblem) { showAlert(alertEl, e.message, 'warning'); return; }
      throw e;
    }
    // Created inside the click handler so that the browser lets it play.
    const player = s.stream ? new StreamPlayer() : null;
    const controller = new AbortController();
    state.job = { controller, player };
    setBusy(true);
    const started = startTimer();
    const base = DOWNLOAD_NAMES[kind];
    $('#result').dataset.playedSamples = '0';
    try {
      const res = await api(req.path, { method: 'POST', json: req.json, form: req.form, signal: controller.signal });
      const rate = parseInt(res.headers.get('X-Sample-Rate') || '', 10) || state.features.sampleRate || 16000;
      if (player) {
        player.rate = rate;
        let first = null;
        const progress = $('#progress-stream');
        try {
          await readAudioStream(res, (bytes) => {
            if (first === null) first = performance.now() - started;
            player.push(bytes);
            progress.textContent = t('streamedSec', { sec: player.seconds.toFixed(1) });
          });
        } catch (e) {
          if (e && e.name === 'AbortError') throw e;
          throw new ApiError(t('streamBroken', { msg: e && e.message ? e.message : String(e) }), 0);
        }
        if (!player.samples) throw new ApiError(t('noAudio'), 200);
        player.finish();
        const took = performance.now() - started;
        const wav = player.toWav();
        showResult({
          playBlob: wav, filename: `${base}.wav`, autoplay: false, mode: 'stream', samples: player.samples,
          meta: `${t('took', { time: fmtDuration(took) })} · ${t('firstAudio', { time: fmtDuration(first || took) })}`,
          info: t('audioInfo', { sec: player.seconds.toFixed(2), rate }),
        });
      } else {
        const blob = await res.blob();
        if (!blob.size) throw new ApiError(t('noAudio'), 200);
        const took = performance.now() - started;
        let playBlob = blob;
        let samples = 0;
        if (fmt === 'pcm') {
          const pcm = bytesToInt16(new Uint8Array(await blob.arrayBuffer()));
          samples = pcm.length;
          playBlob = wavBlob(pcm, rate);
        }
        showResult({
          playBlob, downloadBlob: blob, filename: `${base}.${fmt}`, autoplay: true, mode: 'file', samples,
          meta: t('took', { time: fmtDuration(took) }),
          info: samples ? t('audioInfo', { sec: (samples / rate).toFixed(2), rate }) : `${fmt} · ${(blob.size / 1024).toFixed(1)} KiB`,
        });
      }
      showAlert(alertEl, t('done'), 'success');
    } catch (e) {
      if (player) player.stop();
      if (e && e.name === 'AbortError') showAlert(alertEl, t('stopped'), 'info');
      else showAlert(alertEl, e && e.message ? e.message : String(e), 'error');
    } finally {
      state.job = null;
      stopTimer();
      setBusy(false);
    }
  }

  function stopJob() {
    const job = state.job;
    if (!job) return;
    job.controller.abort();
    if (job.player) job.player.stop();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Tabs
  // ---------------------------------------------------------------------------------------------------------

  function visibleTabs() { return $$('.tab').filter((b) => !b.hidden); }

  function selectTab(name, { focus = false } = {}) {
    state.tab = name;
    $$('.tab').forEach((b) => {
      const on = b.dataset.tab === name;
      b.setAttribute('aria-selected', String(on));
      b.tabIndex = on ? 0 : -1;
      if (on && focus) b.focus();
    });
    $$('.tabpanel').forEach((p) => { p.hidden = p.id !== `panel-${name}`; });
    $('.work').dataset.tab = name;
    if (name !== 'clone' && $('#engine-badge').dataset.state === 'ok') loadRoles();
  }

  function initTabs() {
    const list = $('.tabs');
    list.addEventListener('click', (e) => {
      const b = e.target.closest('.tab');
      if (b) selectTab(b.dataset.tab);
    });
    list.addEventListener('keydown', (e) => {
      const tabs = visibleTabs();
      const i = tabs.indexOf(document.activeElement);
      if (i < 0) return;
      let j = null;
      if (e.key === 'ArrowRight') j = (i + 1) % tabs.length;
      else if (e.key === 'ArrowLeft') j = (i - 1 + tabs.length) % tabs.length;
      else if (e.key === 'Home') j = 0;
      else if (e.key === 'End') j = tabs.length - 1;
      if (j === null) return;
      e.preventDefault();
      selectTab(tabs[j].dataset.tab, { focus: true });
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // Start-up
  // ---------------------------------------------------------------------------------------------------------

  async function refreshAll() {
    hideAlert(globalAlert());
    if (await loadInfo()) await loadRoles();
    renderRoles();
    document.body.dataset.ready = '1';
  }

  function init() {
    const sources = {
      clone: new AudioSource($('[data-audio-source="clone"]'), $('#form-clone .alert')),
      add: new AudioSource($('[data-audio-source="add"]'), $('#voices-alert')),
    };

    initTabs();

    // settings
    loadSettings();
    updateOutputs();
    settingsForm().addEventListener('input', () => { updateOutputs(); saveSettings(); });
    settingsForm().addEventListener('change', saveSettings);
    $('#settings-reset').addEventListener('click', resetSettings);

    // forms
    for (const kind of ['clone', 'role', 'dialogue']) {
      const form = $(`#form-${kind}`);
      form.addEventListener('submit', (e) => { e.preventDefault(); synthesize(kind, form, sources); });
      $$('textarea', form).forEach((ta) => ta.addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
      }));
    }
    $('#form-add-voice').addEventListener('submit', (e) => { e.preventDefault(); addVoice(e.currentTarget, sources.add); });
    $('#voices-refresh').addEventListener('click', loadRoles);
    $('#stop-btn').addEventListener('click', stopJob);
    $('#global-alert .alert-close').addEventListener('click', () => hideAlert(globalAlert()));

    // API key
    const key = $('#api-key');
    key.value = state.apiKey;
    key.addEventListener('change', () => {
      state.apiKey = key.value.trim();
      storageSet(STORE.key, state.apiKey);
      key.removeAttribute('aria-invalid');
      refreshAll();
    });
    key.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); key.dispatchEvent(new Event('change')); } });
    const keyToggle = $('#api-key-toggle');
    keyToggle.addEventListener('click', () => {
      const show = key.type === 'password';
      key.type = show ? 'text' : 'password';
      keyToggle.setAttribute('aria-pressed', String(show));
      setText(keyToggle, show ? 'hide' : 'show');
    });

    // language
    $('#lang-toggle').addEventListener('click', () => {
      state.lang = state.lang === 'zh' ? 'en' : 'zh';
      storageSet(STORE.lang, state.lang);
      applyLanguage();
    });

    applyLanguage();
    applyFeatures();
    refreshAll();

    // for debugging in the browser console
    window.flashtts = { state, reload: refreshAll };
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
