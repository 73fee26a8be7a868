-- The flagship pipeline: earnings-call transcripts -> passages -> 3 questions per passage ->
-- one answer per question -> Parquet.

-- Transcripts: one JSON object per line with ticker, q (quarter), date, transcript.
CREATE EXTERNAL TABLE transcripts STORED AS JSON LOCATION 'data/transcripts/';

-- Cut each transcript into passages of at most 4,096 characters.
CREATE VIEW passages AS
  SELECT ticker, q AS quarter, date, unnest(chunk_text(transcript, 4096)) AS passage
  FROM transcripts;

-- Stage 1: three questions per passage (a failed call keeps its passage, with a NULL question).
CREATE VIEW questions AS
  SELECT ticker, quarter, date, passage,
         unnest(generate_questions(ticker, quarter, date, passage)) AS question,
         generate_questions_error(ticker, quarter, date, passage) AS question_error
  FROM passages;

-- Stage 2: answer each question from its own passage, and write typed Parquet.
COPY (
  SELECT ticker AS company, quarter, date, passage, question,
         answer_question(ticker, quarter, date, passage, question) AS answer,
         question_error,
         answer_question_error(ticker, quarter, date, passage, question) AS answer_error
  FROM questions
) TO 'out/earnings_qa.parquet' STORED AS PARQUET;

-- Read the result back and show a few rows.
CREATE EXTERNAL TABLE earnings_qa STORED AS PARQUET LOCATION 'out/earnings_qa.parquet';
SELECT company, quarter, question, answer FROM earnings_qa LIMIT 5;
